"""How many channels a group of the dependency analyzer keeps: the candidates it may lose, the quota a ratio
takes, and `round_to`'s rounding of kept counts.

`prune_channels`' uniform cut and the latency planner (`fxslim.latency_plan`) both count with these: the
planner times layers at the widths the cut can keep and takes the uniform cut's widths as its target, so
the two must round alike. `round_to=N` rounds a pruned group's kept count to the nearest multiple of its
unit (halves up), never below one unit nor above the group size (a group smaller than one unit stays
whole); the unit is N channels, or N / gcd(N, m) when each channel of the group spans m positions of every
weight dim it runs through (an attention head spans head_dim rows: any head count keeps widths a multiple
of N). This file only counts; it never chooses which channels go."""

from __future__ import annotations

import math

import numpy as np

from fxslim.graph.deps import DependencyGraph, Group


def candidates(g: Group) -> np.ndarray:
    """Positions in `g` of the channels that may be removed (not frozen)."""
    return np.flatnonzero(~g.frozen)


def quota(g: Group, ratio: float) -> int:
    """How many channels `ratio` removes from `g`: floor(ratio * size), at most its candidates, one kept."""
    return min(math.floor(ratio * g.size), len(candidates(g)), g.size - 1)


def channel_units(dg: DependencyGraph, groups: list[Group], round_to: int) -> np.ndarray:
    """Per group, the channel count its kept count must be a multiple of: round_to / gcd(round_to, m), m =
    the gcd of how many positions one channel spans in each weight dim it runs through (1 for a conv's
    output channel, head_dim for an attention head's output-projection columns)."""
    dims = [ids for p in dg.params for ids in p.ids if ids is not None and len(ids)]
    span = np.ones(len(dg.groups), dtype=np.int64)
    if dims:
        atoms = dg.label[np.concatenate(dims)]
        dim = np.repeat(np.arange(len(dims), dtype=np.int64), [len(d) for d in dims])
        pairs, counts = np.unique(atoms.astype(np.int64) * len(dims) + dim, return_counts=True)
        grp = dg.atom_group[pairs // len(dims)]
        sel = grp >= 0
        grp, counts = grp[sel], counts[sel]
        span = np.zeros(len(dg.groups), dtype=np.int64)
        np.gcd.at(span, grp, counts)
        span[span == 0] = 1
    return np.array([round_to // math.gcd(round_to, int(span[g.index])) for g in groups], dtype=np.int64)


def round_kept(g: Group, kept: int, unit: int) -> int:
    """`kept` to the nearest multiple of `unit` (halves up) within [one unit and the frozen channels, the
    largest multiple <= size]; the whole group when no multiple fits."""
    if kept >= g.size or unit == 1:
        return kept
    low = max(unit, -(-int(g.frozen.sum()) // unit) * unit)
    high = g.size // unit * unit
    if high < low:
        return g.size
    return min(max(math.floor(kept / unit + 0.5) * unit, low), high)
