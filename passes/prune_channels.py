"""Pass `prune_channels`: structured channel removal over the dependency groups of the analyzer.

objective="macs" (the default): per prunable group, `floor(ratio * C)` channels with the lowest importance
are removed (never frozen ones, at least one kept, and never the last channel of any tensor dim); with
`global_ranking` the same total is taken from one ranking over all groups, each group's scores divided by
its mean so groups of different scale compare.

objective="latency": every conv / linear / attention layer whose weights a prunable group runs through is
measured alone with onnxruntime at three widths (`fxslim.latency.module_latency`, cached on disk): its groups
keeping all, half and a quarter of their channels as the plan would keep them (rounded to `round_to`, a group
smaller than one unit whole). It gets an affine model `t = a + b * m` of its seconds against its relative MACs
`m` (the product of its weight's kept output and input fractions; a depthwise conv's `m` is its kept channel
fraction, so a memory-bound layer shows its real cost per MAC). The memory-bound ops between the layers
(norms, activations, elementwise arithmetic, pooling: `fxslim.latency_ops`, those onnxruntime fuses into a
conv left out) are timed alone once at full width and scale with the kept fraction of their output channels.
The *estimated latency* of a choice of kept widths is the sum of those models over the measured layers and
ops; the *target* is that estimate at the widths objective="macs" would keep at the same `ratio` and
`round_to`. Groups then shrink greedily, one step at a time (`round_to` channels, or 1/32 of the group),
always taking the step with the least importance lost per estimated second saved, never past `max_ratio` of a
group, until the estimate reaches the target. The importance a step loses is the removed channels' mean score
over their group's mean (as in global ranking) times the MACs the step removes: with equal scores the greedy
removes first the MACs that cost the most seconds (depthwise, memory-bound layers), so it keeps the most MACs
(and importance) for the time it must save. Groups that run through no measured layer are pruned at `ratio` as
with objective="macs".

`round_to=N` rounds every pruned group's kept count to the nearest multiple of its unit (halves up), never
below one unit nor above the group size (a group smaller than one unit stays whole). The unit is N
channels, or N / gcd(N, m) when each channel of the group spans m positions of every weight dim it runs
through (an attention head spans head_dim rows: any head count keeps widths a multiple of N).
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
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from fxslim.errors import PassError
from fxslim.graph.cost import annotate
from fxslim.graph.deps import DependencyGraph, Group, analyze, dims_of
from fxslim.importance import CRITERIA, atom_scores
from fxslim.modules import SlimMultiheadAttention
from fxslim.options import CALIB_BATCHES, Option, Requires, Schema, ignore_option
from fxslim.pass_api import PassContext, PassResult
from fxslim.reconstruct import refit_after_pruning
from fxslim.rewrite import ChannelPlan, apply_plan

NAME = "prune_channels"
OBJECTIVES = ("macs", "latency")
WIDTHS = (1.0, 0.5, 0.25)  # uniform width scales each layer is measured at (objective="latency")
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
    Option("reconstruct", bool, "least-squares re-fit of the layers that read pruned channels (needs data)"),
    CALIB_BATCHES,
    rules=[
        Requires(lambda o: not (o["objective"] == "latency" and o["global_ranking"]),
                 "global_ranking applies to objective='macs' only (latency ranks globally)"),
        Requires(lambda o: o["objective"] == "latency" or (o["max_ratio"] is None and o["latency_table"] is None
                                                           and not o["latency_check"]),
                 "max_ratio, latency_table and latency_check apply to objective='latency' only"),
        Requires(lambda o: o["max_ratio"] is None or o["max_ratio"] >= o["ratio"], "max_ratio must be >= ratio"),
    ],
    needs_data=lambda o: "reconstruct=True re-fits on data" if o["reconstruct"] else None,
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
        units = _units(dg, groups, round_to)
        model = LatencyModel.measure(dg, groups, latency_table, units)
        kept, extra = _choose_latency(groups, scores, model, ratio, units, max_ratio)
        extra["latency"]["round_to"] = round_to
        drop = _drop_lowest(groups, scores, kept)
        if latency_check:
            uniform = _uniform_drop(dg, groups, scores, ratio, False, round_to)
            drop, new, extra["latency"]["check"] = _faster(gm, dg, scores, drop, uniform, ctx.example_inputs)
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
        drop = _drop_lowest(groups, scores, _rounded_kept(groups, drop, _units(dg, groups, round_to)))
    return drop


def _plan(dg: DependencyGraph, drop: np.ndarray, scores: np.ndarray) -> ChannelPlan:
    plan = ChannelPlan(dg)
    plan.target[drop] = -1
    _keep_one_per_dim(dg, plan, scores)
    return plan


def _faster(gm, dg, scores, drop, uniform, example_inputs) -> tuple[np.ndarray, fx.GraphModule, dict]:
    """Of the latency objective's cut and the uniform one, the one whose whole pruned model runs faster in
    onnxruntime (median process CPU time, one thread, the two interleaved); its atoms, its module, a record."""
    import tempfile
    from pathlib import Path

    from fxslim.errors import ExportError
    from fxslim.export import export_onnx, ort_latency

    modules = {
        "latency": apply_plan(gm, _plan(dg, drop, scores)),
        "uniform": apply_plan(gm, _plan(dg, uniform, scores)),
    }
    with tempfile.TemporaryDirectory(prefix="fxslim-latency-check-") as tmp:
        paths = {}
        try:
            for name, module in modules.items():
                paths[name] = Path(tmp) / f"{name}.onnx"
                export_onnx(module, example_inputs, paths[name])
        except ExportError as exc:  # keep the estimate's choice: it cannot be checked
            return drop, modules["latency"], {"kept": "latency", "error": str(exc).splitlines()[0][:200]}
        seconds = ort_latency(paths, example_inputs, budget_s=2.0)
    keep = "latency" if seconds["latency"] <= seconds["uniform"] else "uniform"
    record = {"kept": keep, "latency_s": seconds["latency"], "uniform_s": seconds["uniform"]}
    return (drop if keep == "latency" else uniform), modules[keep], record


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


def _drop_lowest(groups: list[Group], scores: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The lowest-scored candidates of each group, so that group i keeps `kept[i]` channels."""
    out = [np.zeros(0, dtype=np.int64)]
    for g, k in zip(groups, kept, strict=True):
        cand = _candidates(g)
        order = np.argsort(scores[g.atoms[cand]], kind="stable")
        out.append(g.atoms[cand[order[: g.size - int(k)]]])
    return np.concatenate(out)


# ---- rounding ------------------------------------------------------------------------------------------


def _units(dg: DependencyGraph, groups: list[Group], round_to: int) -> np.ndarray:
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


def _round_kept(g: Group, kept: int, unit: int) -> int:
    """`kept` to the nearest multiple of `unit` (halves up) within [one unit and the frozen channels, the
    largest multiple <= size]; the whole group when no multiple fits."""
    if kept >= g.size or unit == 1:
        return kept
    low = max(unit, -(-int(g.frozen.sum()) // unit) * unit)
    high = g.size // unit * unit
    if high < low:
        return g.size
    return min(max(math.floor(kept / unit + 0.5) * unit, low), high)


def _rounded_kept(groups: list[Group], drop: np.ndarray, units: np.ndarray) -> np.ndarray:
    dropped = np.zeros(int(max(g.atoms.max() for g in groups)) + 1, dtype=bool)
    dropped[drop] = True
    return np.array(
        [_round_kept(g, g.size - int(dropped[g.atoms].sum()), int(u)) for g, u in zip(groups, units, strict=True)],
        dtype=np.int64,
    )


# ---- latency model -------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One measured layer: its node, the (weight key, dim) pairs whose widths define it, the fit, the points."""

    node: str
    kind: str
    a: float = 0.0  # seconds at zero MACs (launch overhead, memory traffic not tied to MACs)
    b: float = 0.0  # seconds per unit of relative MACs (the whole layer's MACs = 1)
    points: tuple = ()
    macs: int = 0  # the layer's MACs in the unpruned model (fxslim's counter)


class LatencyModel:
    """Affine per-layer latency in relative MACs; relative MACs = kept fraction of weight dim 0 x dim 1,
    each fraction linear in the groups' kept fractions r: f = (fixed + N @ r) / size."""

    def __init__(
        self,
        layers: list[_Layer],
        n0: np.ndarray,
        n1: np.ndarray,
        c0: np.ndarray,
        c1: np.ndarray,
        measured: int,
        lookups: int,
        table_seconds: float,
        ops: int = 0,
    ):
        self.layers, self.measured, self.lookups, self.table_seconds = layers, measured, lookups, table_seconds
        self.ops = ops  # the last `ops` entries of `layers` are memory-bound ops (fxslim.latency_ops), not layers
        self.a = np.array([x.a for x in layers])
        self.b = np.array([x.b for x in layers])
        self.macs = np.array([x.macs for x in layers], dtype=np.float64)
        self.n0, self.n1, self.c0, self.c1 = n0, n1, c0, c1  # already divided by the dim sizes

    def fractions(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.c0 + self.n0 @ r, self.c1 + self.n1 @ r

    def seconds(self, r: np.ndarray) -> float:
        f0, f1 = self.fractions(r)
        return float((self.a + self.b * f0 * f1).sum())

    def relative_macs_if(self, r: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per layer (rows) and group (columns): each layer's relative MACs now, and when group j alone
        moves by delta[j]."""
        f0, f1 = self.fractions(r)
        g0 = f0[:, None] + self.n0 * delta[None, :]
        g1 = f1[:, None] + self.n1 * delta[None, :]
        return (f0 * f1)[:, None], g0 * g1

    def savings_if(self, r: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per group: estimated seconds saved and MACs removed when group j alone moves by delta[j]."""
        now, then = self.relative_macs_if(r, delta)
        lost = now - then
        return self.b @ lost, self.macs @ lost

    @classmethod
    def measure(
        cls, dg: DependencyGraph, groups: list[Group], table_path: str | None, units: np.ndarray
    ) -> LatencyModel:
        """Time the layers and ops the groups run through; `units`: per group, the multiple its kept count is
        rounded to (`_units`; all 1: no rounding)."""
        from fxslim.latency import LatencyTable, default_table

        table = default_table() if table_path is None else LatencyTable(table_path)
        annotate(dg.gm, dg.example_inputs)  # per-node MACs in node.meta (shapes are already there from analyze)
        count = _GroupCounter(dg, groups)
        layers, rows, tally = _measure_layers(dg, count, table, _timed_fractions(groups, units))
        ops, op_rows = _measure_ops(dg, count, table, tally)
        table.save()
        if not layers:
            raise PassError("objective='latency' found no conv/linear/attention layer to measure")
        rows += op_rows
        n0 = np.stack([r[0][0] / r[0][2] for r in rows])
        n1 = np.stack([r[1][0] / r[1][2] for r in rows])
        c0 = np.array([r[0][1] / r[0][2] for r in rows])
        c1 = np.array([r[1][1] / r[1][2] for r in rows])
        return cls(layers + ops, n0, n1, c0, c1, tally["measured"], tally["lookups"], tally["seconds"], len(ops))


class _GroupCounter:
    """Per tensor dim (an array of index ids): how many of its positions each prunable group holds, how many
    no group holds, and its size."""

    def __init__(self, dg: DependencyGraph, groups: list[Group]) -> None:
        self.dg, self.n = dg, len(groups)
        self.col = np.full(len(dg.groups), -1, dtype=np.int64)
        self.col[[g.index for g in groups]] = np.arange(len(groups))

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, float, int]:
        gi = self.dg.atom_group[self.dg.label[ids]]
        c = np.where(gi >= 0, self.col[np.maximum(gi, 0)], -1)
        return np.bincount(c[c >= 0], minlength=self.n).astype(np.float64), float((c < 0).sum()), len(ids)

    def fixed(self, n: int) -> tuple[np.ndarray, float, int]:
        """A dim no group runs through."""
        return np.zeros(self.n), float(n), n


def _timed_fractions(groups: list[Group], units: np.ndarray) -> dict[float, np.ndarray]:
    """Per width scale of WIDTHS, each group's kept fraction when it keeps that share of its channels, as the
    plan would keep it: at least one channel and its frozen ones, rounded to the group's unit (a group smaller
    than one unit stays whole). A layer's widths follow from the fractions of the groups its weight dims hold
    (exact where a dim holds whole groups; where a split spreads a group over several dims, each dim is taken
    to keep the group's fraction). Layers are timed at these widths: onnxruntime runs some kernels (depthwise
    convs) far slower at channel counts off a multiple of 8, so a fit through an unrounded width would misjudge
    every rounded one."""
    fractions = {}
    for s in WIDTHS:
        kept = [max(1, int(g.frozen.sum()), round(s * g.size)) for g in groups]
        kept = [_round_kept(g, k, int(u)) for g, k, u in zip(groups, kept, units, strict=True)]
        fractions[s] = np.array([k / g.size for g, k in zip(groups, kept, strict=True)])
    return fractions


def _measure_layers(
    dg: DependencyGraph, count: _GroupCounter, table, fractions: dict[float, np.ndarray]
) -> tuple[list[_Layer], list, dict]:
    """Every conv / linear / attention layer a prunable group runs through, timed with its groups at each
    scale's kept `fractions` (`_timed_fractions`) and fitted."""
    import scipy.optimize

    from fxslim.latency import latency_key, module_latency

    params = {p.key: p for p in dg.params}
    gm = dg.gm
    layers, rows, tally = [], [], {"measured": 0, "lookups": 0, "seconds": 0.0}
    for node in gm.graph.nodes:
        spec = _layer_spec(gm, node, params)
        if spec is None:
            continue
        build, dims, dim_sizes = spec
        counts = [count.fixed(n) if ids is None else count(ids) for ids, n in zip(dims, dim_sizes, strict=True)]
        if not any(per.any() for per, _, _ in counts):
            continue
        points = []
        for s in WIDTHS:
            sizes_s = [max(1, round(fixed + per @ fractions[s])) if per.any() else n for per, fixed, n in counts]
            module, shape, rel = build(sizes_s)
            hit = table.get(latency_key(module, shape)) is not None
            t = module_latency(module, shape, table=table, save=False)
            tally["measured"] += not hit
            tally["lookups"] += hit
            points.append((rel, t))
            if s == 1.0:
                tally["seconds"] += t
        m, t = np.array(points).T
        (a, b), _ = scipy.optimize.nnls(np.stack([np.ones_like(m), m], axis=1), t)  # t = a + b*m, a, b >= 0
        points = tuple((float(x), float(y)) for x, y in points)
        macs = int(getattr(node.meta.get("cost"), "macs", 0))
        layers.append(_Layer(node.name, _op_kind(gm, node), float(a), float(b), points, macs))
        rows.append(counts)
    return layers, rows, tally


def _measure_ops(dg: DependencyGraph, count: _GroupCounter, table, tally: dict) -> tuple[list[_Layer], list]:
    """The memory-bound ops between the layers (`fxslim.latency_ops`) whose output a prunable group runs
    through, each timed once at full width: seconds in proportion to the kept fraction of its pruned dims."""
    from fxslim.latency_ops import op_nodes, op_seconds

    gm = dg.gm
    ops, rows = [], []
    for node in op_nodes(gm):
        counts = [c for c in (count(ids) for _, ids in dims_of(dg.values.get(node))) if c[0].any()]
        if not counts:
            continue
        t, hit = op_seconds(gm, node, table)
        tally["measured"] += not hit
        tally["lookups"] += hit
        ops.append(_Layer(node.name, _op_kind(gm, node), 0.0, t, ((1.0, t),), 0))
        rows.append((counts + [count.fixed(1)])[:2])  # its first two pruned dims (most ops have one)
    return ops, rows


def _op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return str(getattr(node.target, "__name__", node.target))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


def _layer_spec(gm: fx.GraphModule, node: fx.Node, params: dict):
    """For a measurable layer: (build(sizes of weight dims 0, 1) -> (module, input shape, relative MACs),
    [ids of weight dim 0, ids of weight dim 1] (None: not tied to channels), [their sizes]); None for any
    other node."""
    if node.op != "call_module" or not node.args:
        return None
    mod = gm.get_submodule(node.target)
    shape = _shape(node.args[0])
    if shape is None:
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and isinstance(mod.padding, (tuple, int)):
        key = f"{node.target}.weight"
        if key not in params or len(shape) != mod.weight.dim():
            return None
        return _conv_builder(mod, shape), params[key].ids[:2], list(mod.weight.shape[:2])
    if isinstance(mod, nn.Linear):
        key = f"{node.target}.weight"
        if key not in params:
            return None
        return _linear_builder(mod, shape), params[key].ids[:2], list(mod.weight.shape[:2])
    if isinstance(mod, (nn.MultiheadAttention, SlimMultiheadAttention)):
        key = f"{node.target}.in_proj_weight"
        if key not in params or any(i is None for i in params[key].ids):
            return None
        return _attention_builder(mod, shape), params[key].ids[:2], list(mod.in_proj_weight.shape[:2])
    return None


def _conv_builder(mod: nn.Conv1d | nn.Conv2d, shape: tuple[int, ...]):
    out0, per_group_in = mod.weight.shape[:2]
    depthwise = mod.groups == mod.in_channels and per_group_in == 1

    def build(sizes: list[int]):
        out, cin = sizes
        if depthwise:
            mult = mod.out_channels // mod.in_channels
            out = max(mult, out // mult * mult)
            groups = out // mult
            inputs = groups
        else:
            groups = mod.groups
            out = max(groups, -(-out // groups) * groups)
            inputs = cin * groups
        new = type(mod)(
            inputs,
            out,
            mod.kernel_size,
            mod.stride,
            mod.padding,
            mod.dilation,
            groups,
            mod.bias is not None,
            mod.padding_mode,
        )
        rel = out / out0 * ((inputs // groups) / per_group_in)
        return new, (shape[0], inputs, *shape[2:]), rel

    return build


def _linear_builder(mod: nn.Linear, shape: tuple[int, ...]):
    def build(sizes: list[int]):
        out, cin = sizes
        rel = out / mod.out_features * cin / mod.in_features
        return nn.Linear(cin, out, bias=mod.bias is not None), (*shape[:-1], cin), rel

    return build


class _SelfAttention(nn.Module):
    """An attention layer called as self-attention (query = key = value), for timing it alone."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _attention_builder(mod: nn.Module, shape: tuple[int, ...]):
    rows, width = mod.in_proj_weight.shape
    head_dim = rows // 3 // mod.num_heads
    out_dim = mod.out_proj.weight.shape[0]

    def build(sizes: list[int]):
        heads = max(1, round(sizes[0] / (3 * head_dim)))
        cin = sizes[1]
        out = max(1, round(out_dim * cin / width))  # the output projection rows follow the residual width
        new = SlimMultiheadAttention(
            cin, heads, head_dim, out, bias=mod.in_proj_bias is not None, batch_first=mod.batch_first
        )
        rel = heads / mod.num_heads * cin / width
        return _SelfAttention(new), (*shape[:-1], cin), rel

    return build


# ---- latency-aware choice ------------------------------------------------------------------------------


def _levels(g: Group, unit: int, max_ratio: float) -> np.ndarray:
    """The kept counts group g may step through, descending from its size (steps of `unit` channels when
    rounding, else about 1/32 of the group), never below (1 - max_ratio) of it nor its frozen channels."""
    low = max(1, int(g.frozen.sum()), math.ceil((1 - max_ratio) * g.size - 1e-9))
    if unit > 1:
        low = max(unit, -(-low // unit) * unit)
        return np.r_[g.size, np.arange(g.size // unit * unit, low - 1, -unit)].astype(np.int64)
    step = max(1, g.size // 32)
    return np.r_[np.arange(g.size, low, -step), low].astype(np.int64)


def _choose_latency(groups, scores, model: LatencyModel, ratio, units: np.ndarray, max_ratio):
    """Greedy: the step with the least importance lost per estimated second saved, until the estimate
    reaches the target (the estimate at the widths objective="macs" keeps with the same rounding: `units`, per
    group, from `_units`). Importance lost = the removed channels' mean score over their group's mean, times
    the MACs they remove: with equal scores the greedy removes the MACs that cost the most seconds (depthwise,
    memory-bound layers) first."""
    max_ratio = (1 + ratio) / 2 if max_ratio is None else max_ratio
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    uniform = np.array(
        [_round_kept(g, g.size - _quota(g, ratio), int(u)) for g, u in zip(groups, units, strict=True)],
        dtype=np.float64,
    )
    target = model.seconds(uniform / sizes)
    layers = len(model.layers) - model.ops  # a group that runs through ops alone has no MACs to price: uniform
    touched = (model.n0[:layers] > 0).any(axis=0) | (model.n1[:layers] > 0).any(axis=0)
    levels, lost = [], []
    for g, u in zip(groups, units, strict=True):
        levels.append(np.unique(_levels(g, int(u), max_ratio))[::-1])
        s = np.sort(scores[g.atoms[_candidates(g)]])
        lost.append(np.r_[0.0, np.cumsum(s / (s.mean() + 1e-12))])  # importance lost by removing the n lowest
    pos = np.zeros(len(groups), dtype=np.int64)
    kept = sizes.copy()
    # groups no measured layer depends on lose `ratio`, as with objective="macs" (from the start: the ops
    # they run through are in the estimate)
    kept[~touched] = uniform[~touched]
    estimate = model.seconds(kept / sizes)
    steps = 0
    while estimate > target:
        nxt = np.array([lv[min(p + 1, len(lv) - 1)] for lv, p in zip(levels, pos, strict=True)], dtype=np.float64)
        movable = (nxt < kept) & touched
        if not movable.any():
            break
        saved, macs = model.savings_if(kept / sizes, (nxt - kept) / sizes)
        score = np.array(
            [
                (lo[int(s - n)] - lo[int(s - k)]) / (k - n) if m else 0.0
                for lo, s, n, k, m in zip(lost, sizes, nxt, kept, movable, strict=True)
            ]
        )
        price = np.where(movable & (saved > 0), score * macs / np.maximum(saved, 1e-30), np.inf)
        j = int(np.argmin(price))
        if not np.isfinite(price[j]):
            break
        pos[j] += 1
        kept[j] = nxt[j]
        estimate = model.seconds(kept / sizes)
        steps += 1
    kept = kept.astype(np.int64)
    record = {
        "latency": {
            "target_s": target,
            "estimated_s": estimate,
            "estimated_full_s": model.seconds(np.ones(len(groups))),
            "table_full_s": model.table_seconds,
            "measured": model.measured,
            "lookups": model.lookups,
            "layers": len(model.layers) - model.ops,
            "ops": model.ops,
            "steps": steps,
            "kept": {g.index: int(k) for g, k in zip(groups, kept, strict=True)},
            "fits": [
                {"node": x.node, "kind": x.kind, "a_s": x.a, "b_s": x.b, "points": x.points} for x in model.layers
            ],
        }
    }
    return kept, record


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
