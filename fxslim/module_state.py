"""Small helpers about a module's state that many passes need: run in eval mode and put every module's own
training flag back (also on an exception), and the device a module lives on. Nothing here changes weights."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own training flag back (a mixed state survives)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
