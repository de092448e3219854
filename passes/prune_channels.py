"""Pass `prune_channels`: structured channel removal over the dependency groups of the analyzer.

Per prunable group, `floor(ratio * C)` channels with the lowest importance are removed (never frozen ones,
at least one kept, and never the last channel of any tensor dim); with `global_ranking` the same total is
taken from one ranking over all groups, each group's scores divided by its mean so groups of different
scale compare. The new module comes from the shared `remove_channels` primitive (rewrite.apply_plan)."""

from __future__ import annotations

import math

import numpy as np
from torch import fx

from fxslim.errors import PassError, RecipeError
from fxslim.graph.deps import DependencyGraph, Group, analyze, dims_of
from fxslim.importance import CRITERIA, atom_scores
from fxslim.pass_api import PassContext, PassResult
from fxslim.rewrite import ChannelPlan, apply_plan

NAME = "prune_channels"


def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    ratio: float = 0.5,
    importance: str = "l1",
    global_ranking: bool = False,
    ignore: list[str] | tuple[str, ...] = (),
) -> PassResult:
    """ratio: fraction of each prunable group's channels removed, in [0, 1).
    importance: "l1" | "l2" | "bn_scale" | "random" (seeded by the recipe seed).
    global_ranking: rank all groups' channels together instead of each group on its own.
    ignore: module names whose channels are never removed (inputs and outputs)."""
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise RecipeError(f"ratio={ratio!r} must be in [0, 1)")
    if importance not in CRITERIA:
        raise RecipeError(f"importance={importance!r}; valid: {', '.join(CRITERIA)}")
    dg = analyze(gm, ctx.example_inputs, ignore=ignore)
    groups = dg.prunable_groups
    if not groups:
        raise PassError(f"no prunable group in {type(gm).__name__}:\n{dg.summary()}")
    scores = atom_scores(dg, importance, ctx.seed)
    drop = _select_global(groups, scores, ratio) if global_ranking else _select_per_group(groups, scores, ratio)
    plan = ChannelPlan(dg)
    plan.target[drop] = -1
    _keep_one_per_dim(dg, plan, scores)
    removed = {g.index: int((plan.target[g.atoms] < 0).sum()) for g in groups}
    ctx.debug("prune_channels: %s", {g.index: (g.size, removed[g.index]) for g in groups})
    if not any(removed.values()):
        return PassResult(gm, False, {"groups": len(groups), "removed": 0})
    new = apply_plan(gm, plan)
    return PassResult(new, True, {
        "groups": len(groups),
        "removed": sum(removed.values()),
        "per_group": [{"members": [repr(m) for m in g.members[:3]], "size": g.size, "removed": removed[g.index]}
                      for g in groups],
        "unsupported": [u.node for u in dg.unsupported],
    })


def _candidates(g: Group) -> np.ndarray:
    return np.flatnonzero(~g.frozen)


def _quota(g: Group, ratio: float) -> int:
    return min(math.floor(ratio * g.size), len(_candidates(g)), g.size - 1)


def _select_per_group(groups: list[Group], scores: np.ndarray, ratio: float) -> np.ndarray:
    out = []
    for g in groups:
        cand = _candidates(g)
        order = np.argsort(scores[g.atoms[cand]], kind="stable")
        out.append(g.atoms[cand[order[: _quota(g, ratio)]]])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _select_global(groups: list[Group], scores: np.ndarray, ratio: float) -> np.ndarray:
    atoms, norm, cap_of = [], [], []
    for g in groups:
        a = g.atoms[_candidates(g)]
        s = scores[a]
        atoms.append(a)
        norm.append(s / (s.mean() + 1e-12))
        cap_of.append(np.full(len(a), g.index))
    atoms, norm, owner = np.concatenate(atoms), np.concatenate(norm), np.concatenate(cap_of)
    budget = math.floor(ratio * len(atoms))
    caps = {g.index: g.size - 1 for g in groups}
    taken: list[int] = []
    for i in np.argsort(norm, kind="stable"):
        if len(taken) == budget:
            break
        if caps[owner[i]] > 0:
            caps[owner[i]] -= 1
            taken.append(int(atoms[i]))
    return np.asarray(taken, dtype=np.int64)


def _keep_one_per_dim(dg: DependencyGraph, plan: ChannelPlan, scores: np.ndarray) -> None:
    """A split or slice can leave some tensor with no channel at all: give such a dim back its best one."""
    dims = [ids for v in dg.values.values() for _, ids in dims_of(v) if len(ids)]
    for ids in dims:
        atoms = dg.label[ids]
        if (plan.target[atoms] < 0).all():
            best = atoms[np.argmax(scores[atoms])]
            plan.target[best] = best

