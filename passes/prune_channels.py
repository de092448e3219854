"""Pass `prune_channels`: structured channel removal over the dependency groups of the analyzer.

objective="macs" (the default): per prunable group, `floor(ratio * C)` channels with the lowest importance
are removed (never frozen ones, at least one kept, and never the last channel of any tensor dim); with
`global_ranking` the same total is taken from one ranking over all groups, each group's scores divided by
its mean so groups of different scale compare.

objective="latency": the latency planner (`fxslim.latency_plan`: each layer and the memory-bound ops between
layers timed alone in onnxruntime, an affine model of seconds against MACs per layer, a greedy over the
groups) decides how many channels each group keeps, so that the estimated time reaches that of
objective="macs" at the same `ratio` and `round_to` for the least importance lost; each group then loses its
lowest-scored channels. `latency_check` times the planned and the uniform cut as whole models and keeps the
faster.

`round_to=N` rounds every pruned group's kept count to the nearest multiple of its unit (halves up), never
below one unit nor above the group size (a group smaller than one unit stays whole); the unit is N channels,
or fewer where one channel spans several positions of a weight dim (`fxslim.channel_counts`).
With objective="latency" it defaults to 8 (LATENCY_ROUND_TO): onnxruntime's blocked (NCHWc) conv kernels on
x86 work on 8 channels at a time, and a conv whose channel count is off that multiple falls back to plain
kernels, for depthwise convs several times slower (docs/results/latency_224.md: without rounding,
MobileNetV3-L pruned for latency at 224x224 ran 0.70 of the original's time, with it 0.39). round_to=1 turns it off.

reconstruct=True re-fits, after the cut, every conv/linear whose inputs lost channels by least squares to
the unpruned layer's outputs on `calib_batches` batches of data (`fxslim.reconstruct`: He et al. 2017, ThiNet),
in graph order, so the pruned model starts its fine-tune closer to the original.

The new module comes from the shared `remove_channels` primitive (rewrite.apply_plan); this file decides
only which channels go and never edits the module it is given."""

from __future__ import annotations

import math

import numpy as np
from torch import fx

from fxslim.channel_counts import candidates, channel_units, quota, round_kept
from fxslim.errors import PassError
from fxslim.graph.deps import DependencyGraph, Group, analyze, dims_of
from fxslim.importance import CRITERIA, atom_scores
from fxslim.options import (
    CALIB_BATCHES,
    RECONSTRUCT,
    Option,
    Requires,
    Schema,
    ignore_option,
    reconstruct_needs_data,
)
from fxslim.pass_api import PassContext, PassResult
from fxslim.reconstruct import refit_after_pruning
from fxslim.rewrite import ChannelPlan, apply_plan

NAME = "prune_channels"
OBJECTIVES = ("macs", "latency")
LATENCY_ROUND_TO = 8  # round_to's default with objective="latency" (onnxruntime's NCHWc block on x86 AVX2)

OPTIONS = Schema(
    Option("ratio", float, "fraction of each prunable group's channels removed, floor(ratio*C), one kept",
           range="[0, 1)"),
    Option("importance", str, "channel score", choices=CRITERIA),
    Option("global_ranking", bool, "rank channels across groups (objective macs) instead of within each"),
    ignore_option("module names whose channels are never removed (inputs and outputs)"),
    Option("round_to", int, "keep a multiple of this many channels per group; None: 1 (8 for latency)",
           range=">= 1", none=True),
    Option("objective", str, "macs: the same ratio everywhere; latency: cut where it saves measured time",
           choices=OBJECTIVES),
    Option("max_ratio", float, "latency: the most any group may lose", range="[0, 1)", none=True),
    Option("latency_table", str, "latency: a JSON file the per-layer timings are cached in", none=True),
    Option("latency_check", bool, "latency: time the plan against the uniform cut and keep the faster"),
    RECONSTRUCT,
    CALIB_BATCHES,
    rules=[
        Requires(lambda o: not (o["objective"] == "latency" and o["global_ranking"]),
                 "global_ranking applies to objective='macs' only (latency ranks globally)"),
        Requires(lambda o: o["objective"] == "latency" or (o["max_ratio"] is None and o["latency_table"] is None
                                                           and not o["latency_check"]),
                 "max_ratio, latency_table and latency_check apply to objective='latency' only"),
        Requires(lambda o: o["max_ratio"] is None or o["max_ratio"] >= o["ratio"],
                 lambda o: f"max_ratio={o['max_ratio']!r} must be in [ratio, 1) = [{o['ratio']}, 1)"),
    ],
    needs_data=reconstruct_needs_data,
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    ratio: float = 0.5,
    importance: str = "l1",
    global_ranking: bool = False,
    ignore: list[str] | tuple[str, ...] = (),
    round_to: int | None = None,
    objective: str = "macs",
    max_ratio: float | None = None,
    latency_table: str | None = None,
    latency_check: bool = False,
    reconstruct: bool = False,
    calib_batches: int = 8,
) -> PassResult:
    """ratio: fraction of each prunable group's channels removed, in [0, 1).
    importance: "l1" | "l2" | "bn_scale" | "random" (seeded by the recipe seed).
    global_ranking: rank all groups' channels together instead of each group on its own (objective="macs").
    ignore: module names whose channels are never removed (inputs and outputs).
    round_to: kept channel counts of pruned groups become multiples of this (1: no rounding; default 8 with
    objective="latency", whose onnxruntime kernels run fastest at multiples of 8 channels, else 1).
    objective: "macs" (every group loses `ratio`) or "latency" (measured per-layer latency decides which
    groups shrink, down to the estimated latency that `ratio` gives with "macs").
    max_ratio: objective="latency": the most any group may lose (default (1 + ratio) / 2).
    latency_table: objective="latency": JSON file of measured layer latencies (default: the on-disk cache).
    latency_check: objective="latency": time the whole pruned model against the one objective="macs" gives
    (same ratio and round_to; onnxruntime, one thread, interleaved) and keep the faster: the estimate sums
    layers and ops timed alone, which can misjudge a whole model (small inputs, where fixed per-run overhead
    dominates a layer timed alone). Costs two exports and a few seconds of timing.
    reconstruct: re-fit every conv/linear whose inputs lost channels by least squares to the unpruned
    layer's outputs, on the first `calib_batches` batches of data (`fxslim.reconstruct`; needs data)."""
    if round_to is None:
        round_to = LATENCY_ROUND_TO if objective == "latency" else 1
    data = ctx.require_data(NAME) if reconstruct else None
    dg = analyze(gm, ctx.example_inputs, ignore=ignore)
    groups = dg.prunable_groups
    if not groups:
        raise PassError(f"no prunable group in {type(gm).__name__}:\n{dg.summary()}")
    scores = atom_scores(dg, importance, ctx.seed)
    extra: dict = {}
    new = None
    if objective == "latency":
        from fxslim import latency_plan  # lazy: onnxruntime and its timing only for this objective

        units = channel_units(dg, groups, round_to)
        kept, extra = latency_plan.plan_widths(dg, groups, scores, ratio, units, max_ratio, latency_table)
        extra["latency"]["round_to"] = round_to
        drop = _drop_lowest(groups, scores, kept)
        if latency_check:
            cuts = {"latency": drop, "uniform": _uniform_drop(dg, groups, scores, ratio, False, round_to)}
            modules = {name: apply_plan(gm, _plan(dg, cut, scores)) for name, cut in cuts.items()}
            keep, extra["latency"]["check"] = latency_plan.check_faster(
                modules["latency"], modules["uniform"], ctx.example_inputs
            )
            drop, new = cuts[keep], modules[keep]
    else:
        drop = _uniform_drop(dg, groups, scores, ratio, global_ranking, round_to)
    plan = _plan(dg, drop, scores)
    removed = {g.index: int((plan.target[g.atoms] < 0).sum()) for g in groups}
    ctx.debug("prune_channels: %s", {g.index: (g.size, removed[g.index]) for g in groups})
    if not any(removed.values()):
        return PassResult(gm, False, {"groups": len(groups), "removed": 0, **extra})
    new = apply_plan(gm, plan) if new is None else new
    if reconstruct:
        extra["reconstructed"] = refit_after_pruning(new, gm, plan, data, calib_batches, ctx.seed)
    return PassResult(
        new,
        True,
        {
            "groups": len(groups),
            "removed": sum(removed.values()),
            "per_group": [
                {
                    "members": [repr(m) for m in g.members[:3]],
                    "size": g.size,
                    "removed": removed[g.index],
                    "kept": g.size - removed[g.index],
                }
                for g in groups
            ],
            "unsupported": [u.node for u in dg.unsupported],
            **extra,
        },
    )


def _uniform_drop(dg, groups, scores, ratio, global_ranking, round_to) -> np.ndarray:
    """The atoms objective="macs" removes: `ratio` of each group (or of one global ranking), rounded."""
    drop = _select_global(groups, scores, ratio) if global_ranking else _select_per_group(groups, scores, ratio)
    if round_to > 1:
        drop = _drop_lowest(groups, scores, _rounded_kept(groups, drop, channel_units(dg, groups, round_to)))
    return drop


def _plan(dg: DependencyGraph, drop: np.ndarray, scores: np.ndarray) -> ChannelPlan:
    plan = ChannelPlan(dg)
    plan.target[drop] = -1
    _keep_one_per_dim(dg, plan, scores)
    return plan


def _select_per_group(groups: list[Group], scores: np.ndarray, ratio: float) -> np.ndarray:
    out = []
    for g in groups:
        cand = candidates(g)
        order = np.argsort(scores[g.atoms[cand]], kind="stable")
        out.append(g.atoms[cand[order[: quota(g, ratio)]]])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _select_global(groups: list[Group], scores: np.ndarray, ratio: float) -> np.ndarray:
    atoms, norm, cap_of = [], [], []
    for g in groups:
        a = g.atoms[candidates(g)]
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


def _drop_lowest(groups: list[Group], scores: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The lowest-scored candidates of each group, so that group i keeps `kept[i]` channels."""
    out = [np.zeros(0, dtype=np.int64)]
    for g, k in zip(groups, kept, strict=True):
        cand = candidates(g)
        order = np.argsort(scores[g.atoms[cand]], kind="stable")
        out.append(g.atoms[cand[order[: g.size - int(k)]]])
    return np.concatenate(out)


def _rounded_kept(groups: list[Group], drop: np.ndarray, units: np.ndarray) -> np.ndarray:
    dropped = np.zeros(int(max(g.atoms.max() for g in groups)) + 1, dtype=bool)
    dropped[drop] = True
    return np.array(
        [round_kept(g, g.size - int(dropped[g.atoms].sum()), int(u)) for g, u in zip(groups, units, strict=True)],
        dtype=np.int64,
    )


def _keep_one_per_dim(dg: DependencyGraph, plan: ChannelPlan, scores: np.ndarray) -> None:
    """A split or slice can leave some tensor with no channel at all: give such a dim back its best one."""
    dims = [ids for v in dg.values.values() for _, ids in dims_of(v) if len(ids)]
    if not dims:
        return
    # One vectorised test finds the dims left empty; giving a channel back only refills dims, so the
    # ordered loop below over those alone decides exactly as a loop over every dim would.
    gone = plan.target[dg.label[np.concatenate(dims)]] < 0
    empty = np.logical_and.reduceat(gone, np.cumsum([0] + [len(ids) for ids in dims[:-1]]))
    for i in np.flatnonzero(empty):
        atoms = dg.label[dims[i]]
        if (plan.target[atoms] < 0).all():
            best = atoms[np.argmax(scores[atoms])]
            plan.target[best] = best
