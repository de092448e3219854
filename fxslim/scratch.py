"""A reusable buffer for large temporaries.

A fresh tensor per large temporary is a fresh allocation whose pages the kernel must fault in, which on this
machine cost as much as the arithmetic that fills it (|w| of every weight for importance scores, the
intermediate of a weight re-indexed along two dims). `Scratch.take` hands out views of one buffer that grows
when a request does not fit: a view is valid until the next `take`."""

from __future__ import annotations

import math

import torch


class Scratch:
    """One growing buffer: `take(shape, like)` is a view of `shape` with `like`'s dtype and device."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buf
        if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < n:
            self._buf = buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)
