"""Channel importance: one score per atom of a DependencyGraph, summed over every parameter slice the
atom owns (producer rows, consumer columns, norm affine weights), so coupled layers vote together.

Criteria: "l1" (sum |w|), "l2" (sqrt of sum w²), "bn_scale" (|γ| of the BatchNorm/GroupNorm/LayerNorm
weights in the group; groups without a norm fall back to l1), "random" (seeded). Buffers (running
statistics) never count. This file computes scores only; it never decides or changes anything."""

from __future__ import annotations

import math

import numpy as np
import torch

from fxslim.errors import RecipeError
from fxslim.graph.deps import DependencyGraph
from fxslim.scratch import Scratch

CRITERIA = ("l1", "l2", "bn_scale", "random")


def atom_scores(dg: DependencyGraph, criterion: str, seed: int = 0) -> np.ndarray:
    """Importance of every atom (index = atom id) under `criterion`."""
    if criterion not in CRITERIA:
        raise RecipeError(f"importance={criterion!r}; valid: {', '.join(CRITERIA)}")
    n = int(dg.label.max()) + 1 if len(dg.label) else 0
    if criterion == "random":
        return np.random.default_rng(seed).random(n)
    params = dict(dg.gm.named_parameters())
    scratch = Scratch()  # |w| of one weight at a time, in reused memory
    # (atom ids, weights) of every coupled dim, summed by one bincount at the end: a bincount per dim
    # would cost O(atoms) each, quadratic on large graphs
    at, wt, norm_at, norm_wt = [], [], [], []
    for p in dg.params:
        t = params.get(p.key)
        if t is None:
            continue
        t = t.detach().float()
        mag = _magnitude(t, criterion, scratch)  # once per tensor, summed per coupled dim below
        coupled = [k for k, ids in enumerate(p.ids) if ids is not None]
        if coupled and mag.dim() > max(coupled) + 1:  # the uncoupled trailing dims (a kernel), summed once
            mag = _sum_trailing(mag, max(coupled) + 1)
        for k in coupled:
            other = [d for d in range(mag.dim()) if d != k]
            atoms = dg.label[p.ids[k]]
            at.append(atoms)
            wt.append(_np(mag.sum(other) if other else mag))
            if criterion == "bn_scale" and p.roles[k] == "norm" and p.key.endswith(".weight") and t.dim() == 1:
                norm_at.append(atoms)
                norm_wt.append(_np(mag))
    total = _bincount(at, wt, n)  # sum |w| (l1, bn_scale's fallback) or sum w² (l2)
    if criterion == "l1":
        return total
    if criterion == "l2":
        return np.sqrt(total)
    # bn_scale: groups with a norm layer use |γ|; the others fall back to l1
    norm = _bincount(norm_at, norm_wt, n)
    has_norm = np.zeros(n, dtype=bool)
    for atoms in norm_at:
        has_norm[atoms] = True
    out = total.copy()
    for g in dg.groups:
        if has_norm[g.atoms].all():
            out[g.atoms] = norm[g.atoms]
    return out


def _sum_trailing(mag: torch.Tensor, lead: int) -> torch.Tensor:
    """`mag` summed over every dim from `lead` on, as one matrix-vector product: torch's reduction over
    small inner dims (a 3x3 kernel) is ~30x slower here than BLAS."""
    shape = mag.shape[:lead]
    k = math.prod(mag.shape[lead:])
    if k <= 1:
        return mag.reshape(shape) if k else mag.new_zeros(shape)
    return (mag.reshape(-1, k) @ torch.ones(k, dtype=mag.dtype, device=mag.device)).view(shape)


def _bincount(atoms: list[np.ndarray], weights: list[np.ndarray], n: int) -> np.ndarray:
    if not atoms:
        return np.zeros(n)
    return np.bincount(np.concatenate(atoms), weights=np.concatenate(weights), minlength=n)


def _magnitude(t: torch.Tensor, criterion: str, scratch: Scratch) -> torch.Tensor:
    """|t| or t² written into `scratch` (valid until its next use)."""
    out = scratch.take(t.shape, t)
    return torch.square(t, out=out) if criterion == "l2" else torch.abs(t, out=out)


def _np(t: torch.Tensor) -> np.ndarray:
    """A float64 copy (never a view of the scratch buffer: `t` is float32, so `double()` copies)."""
    return t.double().numpy()
