"""The latency planner of `prune_channels(objective="latency")`: how many channels each group keeps so that
the pruned model's estimated onnxruntime time reaches that of the uniform cut, losing the least importance.

Every conv / linear / attention layer whose weights a prunable group runs through is measured alone with
onnxruntime at three widths (`fxslim.latency.module_latency`, cached on disk): its groups keeping all, half
and a quarter of their channels as the plan would keep them (rounded to `round_to`, a group smaller than one
unit whole). It gets an affine model `t = a + b * m` of its seconds against its relative MACs `m` (the
product of its weight's kept output and input fractions; a depthwise conv's `m` is its kept channel fraction,
so a memory-bound layer shows its real cost per MAC). The memory-bound ops between the layers (norms,
activations, elementwise arithmetic, pooling: `fxslim.latency_ops`, those onnxruntime fuses into a conv left
out) are timed alone once at full width and scale with the kept fraction of their output channels. The
*estimated latency* of a choice of kept widths is the sum of those models over the measured layers and ops;
the *target* is that estimate at the widths objective="macs" would keep at the same `ratio` and `round_to`.
Groups then shrink greedily, one step at a time (`round_to` channels, or 1/32 of the group), always taking
the step with the least importance lost per estimated second saved, never past `max_ratio` of a group,
until the estimate reaches the target. The importance a step loses is the removed channels' mean score over
their group's mean (as in global ranking) times the MACs the step removes: with equal scores the greedy
removes first the MACs that cost the most seconds (depthwise, memory-bound layers), so it keeps the most
MACs (and importance) for the time it must save. Groups that run through no measured layer are pruned at
`ratio` as with objective="macs".

`plan_widths` gives the kept count per group and `check_faster` times two whole pruned models against each
other (`latency_check`). This file decides counts and measures; it never chooses which channels go (the pass
does, by importance) and never changes the module it is given."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import fx, nn

from fxslim.channel_counts import candidates, quota, round_kept
from fxslim.errors import ExportError, PassError
from fxslim.graph.cost import annotate
from fxslim.graph.deps import DependencyGraph, Group, dims_of
from fxslim.graph.shape import out_shape
from fxslim.latency import LatencyTable, default_table, latency_key, module_latency
from fxslim.latency_ops import op_nodes, op_seconds
from fxslim.modules import SlimMultiheadAttention

WIDTHS = (1.0, 0.5, 0.25)  # uniform width scales each layer is measured at


def plan_widths(
    dg: DependencyGraph,
    groups: list[Group],
    scores: np.ndarray,
    ratio: float,
    units: np.ndarray,
    max_ratio: float | None,
    table_path: str | None,
) -> tuple[np.ndarray, dict]:
    """Per group, the channels it keeps, and the record under "latency": the layers and ops the groups run
    through timed (`table_path`: a JSON table, None: the on-disk cache) and fitted, then the greedy choice.
    `units`: per group, the multiple its kept count is rounded to (`fxslim.channel_counts.channel_units`)."""
    model = LatencyModel.measure(dg, groups, table_path, units)
    return choose_widths(groups, scores, model, ratio, units, max_ratio)


def check_faster(planned: fx.GraphModule, uniform: fx.GraphModule, example_inputs: tuple) -> tuple[str, dict]:
    """Which of the planned cut and the uniform one runs faster as a whole model in onnxruntime (median
    process CPU time, one thread, the two interleaved): "latency" or "uniform", and a record. The estimate
    sums layers and ops timed alone, which can misjudge a whole model (small inputs, where a session's fixed
    overhead dominates a layer timed alone). A model that does not export keeps the plan: it cannot be
    checked."""
    from fxslim.export import export_onnx, ort_latency  # lazy: the exporter pulls in onnx tooling

    modules = {"latency": planned, "uniform": uniform}
    with tempfile.TemporaryDirectory(prefix="fxslim-latency-check-") as tmp:
        paths = {}
        try:
            for name, module in modules.items():
                paths[name] = Path(tmp) / f"{name}.onnx"
                export_onnx(module, example_inputs, paths[name])
        except ExportError as exc:
            return "latency", {"kept": "latency", "error": str(exc).splitlines()[0][:200]}
        seconds = ort_latency(paths, example_inputs, budget_s=2.0)
    keep = "latency" if seconds["latency"] <= seconds["uniform"] else "uniform"
    return keep, {"kept": keep, "latency_s": seconds["latency"], "uniform_s": seconds["uniform"]}


# ---- latency model -------------------------------------------------------------------------------------


@dataclass
class Layer:
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
        layers: list[Layer],
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
        rounded to (all 1: no rounding)."""
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
        kept = [round_kept(g, k, int(u)) for g, k, u in zip(groups, kept, units, strict=True)]
        fractions[s] = np.array([k / g.size for g, k in zip(groups, kept, strict=True)])
    return fractions


def _measure_layers(
    dg: DependencyGraph, count: _GroupCounter, table, fractions: dict[float, np.ndarray]
) -> tuple[list[Layer], list, dict]:
    """Every conv / linear / attention layer a prunable group runs through, timed with its groups at each
    scale's kept `fractions` (`_timed_fractions`) and fitted."""
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
        layers.append(Layer(node.name, _op_kind(gm, node), float(a), float(b), points, macs))
        rows.append(counts)
    return layers, rows, tally


def _measure_ops(dg: DependencyGraph, count: _GroupCounter, table, tally: dict) -> tuple[list[Layer], list]:
    """The memory-bound ops between the layers (`fxslim.latency_ops`) whose output a prunable group runs
    through, each timed once at full width: seconds in proportion to the kept fraction of its pruned dims."""
    gm = dg.gm
    ops, rows = [], []
    for node in op_nodes(gm):
        counts = [c for c in (count(ids) for _, ids in dims_of(dg.values.get(node))) if c[0].any()]
        if not counts:
            continue
        t, hit = op_seconds(gm, node, table)
        tally["measured"] += not hit
        tally["lookups"] += hit
        ops.append(Layer(node.name, _op_kind(gm, node), 0.0, t, ((1.0, t),), 0))
        rows.append((counts + [count.fixed(1)])[:2])  # its first two pruned dims (most ops have one)
    return ops, rows


def _op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return str(getattr(node.target, "__name__", node.target))


def _layer_spec(gm: fx.GraphModule, node: fx.Node, params: dict):
    """For a measurable layer: (build(sizes of weight dims 0, 1) -> (module, input shape, relative MACs),
    [ids of weight dim 0, ids of weight dim 1] (None: not tied to channels), [their sizes]); None for any
    other node."""
    if node.op != "call_module" or not node.args:
        return None
    mod = gm.get_submodule(node.target)
    shape = out_shape(node.args[0])
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


def choose_widths(
    groups: list[Group],
    scores: np.ndarray,
    model: LatencyModel,
    ratio: float,
    units: np.ndarray,
    max_ratio: float | None,
) -> tuple[np.ndarray, dict]:
    """Greedy: the step with the least importance lost per estimated second saved, until the estimate
    reaches the target (the estimate at the widths objective="macs" keeps with the same rounding: `units`, per
    group, from `channel_units`). Importance lost = the removed channels' mean score over their group's mean,
    times the MACs they remove: with equal scores the greedy removes the MACs that cost the most seconds
    (depthwise, memory-bound layers) first."""
    max_ratio = (1 + ratio) / 2 if max_ratio is None else max_ratio
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    uniform = np.array(
        [round_kept(g, g.size - quota(g, ratio), int(u)) for g, u in zip(groups, units, strict=True)],
        dtype=np.float64,
    )
    target = model.seconds(uniform / sizes)
    layers = len(model.layers) - model.ops  # a group that runs through ops alone has no MACs to price: uniform
    touched = (model.n0[:layers] > 0).any(axis=0) | (model.n1[:layers] > 0).any(axis=0)
    levels, lost = [], []
    for g, u in zip(groups, units, strict=True):
        levels.append(np.unique(_levels(g, int(u), max_ratio))[::-1])
        s = np.sort(scores[g.atoms[candidates(g)]])
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
