"""Channel importance: one score per atom of a DependencyGraph, summed over every parameter slice the
atom owns (producer rows, consumer columns, norm affine weights), so coupled layers vote together.

Criteria: "l1" (sum |w|), "l2" (sqrt of sum w²), "bn_scale" (|γ| of the BatchNorm/GroupNorm/LayerNorm
weights in the group; groups without a norm fall back to l1), "random" (seeded). Buffers (running
statistics) never count. This file computes scores only; it never decides or changes anything."""

from __future__ import annotations

import numpy as np
import torch

from fxslim.errors import RecipeError
from fxslim.graph.deps import DependencyGraph

CRITERIA = ("l1", "l2", "bn_scale", "random")


def atom_scores(dg: DependencyGraph, criterion: str, seed: int = 0) -> np.ndarray:
    """Importance of every atom (index = atom id) under `criterion`."""
    if criterion not in CRITERIA:
        raise RecipeError(f"importance={criterion!r}; valid: {', '.join(CRITERIA)}")
    n = int(dg.label.max()) + 1 if len(dg.label) else 0
    if criterion == "random":
        return np.random.default_rng(seed).random(n)
    total = np.zeros(n)  # sum |w| (l1, bn_scale's fallback) or sum w² (l2)
    norm = np.zeros(n)
    has_norm = np.zeros(n, dtype=bool)
    params = dict(dg.gm.named_parameters())
    for p in dg.params:
        t = params.get(p.key)
        if t is None:
            continue
        t = t.detach().float()
        mag = t.pow(2) if criterion == "l2" else t.abs()  # once per tensor, summed per coupled dim below
        coupled = [k for k, ids in enumerate(p.ids) if ids is not None]
        if coupled and mag.dim() > max(coupled) + 1:  # the uncoupled trailing dims (a kernel), summed once
            mag = mag.sum(list(range(max(coupled) + 1, mag.dim())))
        for k in coupled:
            ids = p.ids[k]
            other = [d for d in range(mag.dim()) if d != k]
            atoms = dg.label[ids]
            total += np.bincount(atoms, weights=_np(mag.sum(other) if other else mag), minlength=n)
            if criterion == "bn_scale" and p.roles[k] == "norm" and p.key.endswith(".weight") and t.dim() == 1:
                norm += np.bincount(atoms, weights=_np(mag), minlength=n)
                has_norm[atoms] = True
    if criterion == "l1":
        return total
    if criterion == "l2":
        return np.sqrt(total)
    # bn_scale: groups with a norm layer use |γ|; the others fall back to l1
    out = total.copy()
    for g in dg.groups:
        if has_norm[g.atoms].all():
            out[g.atoms] = norm[g.atoms]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()
