"""The low-rank driver that `lowrank_conv` and `lowrank_linear` share (docs/notes/methods.md, "LRF"): the
`Factorisation` interface each pass's methods implement, the options common to both passes (one schema,
one `LowRankOptions` object), and `factorise`, which records calibration inputs, searches each layer's
rank by feature-map similarity (galloping then bisection, or a `step` scan), picks per layer the method
with the lowest objective among those meeting the threshold, optionally tightens the threshold to a
whole-model similarity budget and re-fits the chains' last layers by least squares. It knows no method
by name and no layer type: the passes bring those (`LayerKind`). The graph edit is
`fxslim.rewrite.replace_modules(inline=True)`; the input module is never changed."""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxslim import linalg
from fxslim.errors import PassError
from fxslim.graph.clone import clone_gm
from fxslim.graph.shape import propagate
from fxslim.module_state import eval_mode
from fxslim.options import (
    CALIB_BATCHES,
    Option,
    Requires,
    Schema,
    calib_samples_option,
    ignore_option,
    reconstruct_needs_data,
)
from fxslim.pass_api import PassContext, PassResult
from fxslim.reconstruct import refit_outputs_
from fxslim.rewrite import replace_modules
from fxslim.training import split_batch

OBJECTIVES = ("flops", "memory", "latency")
SEARCHES = ("bisect", "step")

# ---------------------------------------------------------------------------------------------------------
# One layer's factorisations. `k` is a rank index in 1..full (the chain at `full` is exact, except CP, whose
# `full` only bounds the search); `nominal` is the rank a fraction `rank=` refers to. Costs are per sample.

class Factorisation:
    method = ""

    def __init__(
        self, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], seed: int = 0, **_: object
    ) -> None:
        self.module, self.in_shape, self.out_shape, self.seed = module, tuple(in_shape), tuple(out_shape), seed
        self.full = self.nominal = 1

    def ranks(self, k: int) -> tuple[int, ...]:
        raise NotImplementedError

    def chain(self, k: int) -> nn.Module:
        raise NotImplementedError

    def cost(self, k: int) -> tuple[int, int]:
        """(params, MACs per sample) of the chain at rank index k."""
        raise NotImplementedError

    def original_cost(self) -> tuple[int, int]:
        raise NotImplementedError

    def weight(self, k: int) -> np.ndarray:
        """The dense weight the chain at rank index k stands for (for reconstruction errors)."""
        raise NotImplementedError


def bias_params(module: nn.Module) -> int:
    return 0 if module.bias is None else module.bias.numel()


def proportional_rank(k: int, full: int, total: int) -> int:
    """Rank of one mode at rank index k of `total`, proportional to that mode's full rank."""
    return max(1, min(full, math.ceil(k * full / total)))


@dataclass(frozen=True)
class LayerKind:
    """What a low-rank pass brings to the driver: its name, its methods and which layers it factorises."""

    pass_name: str
    methods: dict[str, type[Factorisation]]
    layer_types: tuple[type, ...]
    skip_reason: Callable[[nn.Module], str | None]


@dataclass(frozen=True)
class LowRankOptions:
    """The options of a low-rank pass as one object; `factorisation` holds a pass's own (e.g. cp_iterations),
    handed to each Factorisation."""

    method: str
    rank: int | float | None
    similarity: float
    objective: str
    search: str
    step: int
    calib_samples: int
    model_similarity: float | None
    dissimilarity_scale: dict[str, float] | None
    candidates: list[str] | tuple[str, ...] | None
    ignore: list[str] | tuple[str, ...]
    reconstruct: bool
    calib_batches: int
    factorisation: dict = field(default_factory=dict)

    @classmethod
    def take(cls, options: Mapping) -> LowRankOptions:
        """The shared options from a pass's keyword options; every other option goes to `factorisation`."""
        shared = {f.name for f in fields(cls)} - {"factorisation"}
        return cls(**{k: v for k, v in options.items() if k in shared},
                   factorisation={k: v for k, v in options.items() if k not in shared})

    def method_names(self, methods: Iterable[str]) -> list[str]:
        """The methods tried per layer: `[method]`, or for "auto" the candidates (all methods by default)."""
        methods = list(methods)
        if self.method != "auto":
            return [self.method]
        return [m for m in methods if self.candidates is None or m in self.candidates]


def _rank_problem(rank) -> str | None:
    ok = rank >= 1 if isinstance(rank, int) else 0 < rank <= 1
    return None if ok else "must be an integer >= 1 or a fraction in (0, 1]"


# The defaults of the options every low-rank pass has, in the order of its signature (the pass's own options
# go after model_similarity).
_SHARED_BEFORE = {"rank": None, "similarity": 0.92, "objective": "flops", "search": "bisect", "step": 1,
                  "calib_samples": 1000, "model_similarity": None}
_SHARED_AFTER = {"dissimilarity_scale": None, "candidates": None, "ignore": (), "reconstruct": False,
                 "calib_batches": 8}


def low_rank_pass(kind: LayerKind, method: str, doc: str, own: dict[Option, Any] | None = None):
    """`(OPTIONS, run)` of a low-rank pass: `run(gm, ctx, *, method=method, <shared options>, <own options>)`
    factorises the layers `kind` names, its options checked by `OPTIONS`; `own` maps the pass's own options to
    their defaults (handed to its Factorisations)."""
    own = own or {}
    defaults = {"method": method, **_SHARED_BEFORE, **{o.name: d for o, d in own.items()}, **_SHARED_AFTER}

    def run(gm: fx.GraphModule, ctx: PassContext, **options: Any) -> PassResult:
        return factorise(gm, ctx, kind, LowRankOptions.take({**defaults, **options}))

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    run.__signature__ = inspect.Signature(
        [inspect.Parameter("gm", positional), inspect.Parameter("ctx", positional)]
        + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()],
        return_annotation=PassResult,
    )
    run.__doc__, run.__qualname__, run.__module__ = doc, "run", f"fxslim.passes.{kind.pass_name}"
    schema = _low_rank_schema(kind, *own)
    return schema, schema.checks(run)


def _has_layers(gm: fx.GraphModule, kind: LayerKind, options: Mapping) -> bool:
    """Whether `gm` calls a layer the pass would consider (of its types, not ignored by module or node name, as
    `_layers` reads `ignore`): the rank search's data is needed only then."""
    ignored = set(options["ignore"] or ())
    return any(
        n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind.layer_types)
        and n.target not in ignored and n.name not in ignored
        for n in gm.graph.nodes
    )


def _low_rank_schema(kind: LayerKind, *own: Option) -> Schema:
    """The schema of a low-rank pass over `kind`'s methods (plus "auto"), with the pass's `own` options."""
    methods = tuple(kind.methods)

    def scale_problem(scale: dict) -> str | None:
        for name, factor in scale.items():
            if name not in methods:
                return f"names {name!r}; valid methods: {', '.join(methods)}"
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
                return f"gives {name!r} the factor {factor!r}; each must be in (0, 1]"
        return None

    def candidates_problem(candidates) -> str | None:
        if not candidates:
            return "must be a non-empty list of methods"
        if unknown := [c for c in candidates if c not in methods]:
            return f"names {unknown[0]!r}; valid: {', '.join(methods)}"
        return "names a method twice" if len(set(candidates)) != len(candidates) else None

    return Schema(
        Option("method", str, "the factorisation; auto: per layer the cheapest meeting the similarity",
               choices=(*methods, "auto")),
        Option("rank", float, "None: search by similarity; an integer rank index; a fraction of the nominal rank",
               none=True, check=_rank_problem, valid="an integer >= 1 or a fraction in (0, 1]"),
        Option("similarity", float, "per-layer mean cosine similarity the chain's output must reach", range="(0, 1]"),
        Option("objective", str, "what auto minimises: flops (MACs), memory (params), latency (onnxruntime)",
               choices=OBJECTIVES),
        Option("search", str, "bisect (gallop then bisect the similarity curve) or step (rank 1, 1 + step, ...)",
               choices=SEARCHES),
        Option("step", int, "rank step of search='step'", range=">= 1"),
        calib_samples_option("calibration samples read from data for the rank search"),
        Option("model_similarity", float, "whole-model budget: cosine similarity of the outputs; None: off",
               range="(0, 1]", none=True),
        *own,
        Option("dissimilarity_scale", dict, "auto only: per method a factor in (0, 1] on its allowed dissimilarity",
               none=True, check=scale_problem, valid="a table method -> factor in (0, 1]"),
        Option("candidates", list, "auto only: the methods chosen from (default: all)", items=str, none=True,
               check=candidates_problem),
        ignore_option("module or node names left alone", nodes=True),
        Option("reconstruct", bool, "least-squares re-fit of each chain's last layer to the original's output"),
        CALIB_BATCHES,
        rules=[
            Requires(lambda o: o["method"] != "auto" or o["rank"] is None,
                     "method='auto' chooses by similarity; set rank=None"),
            Requires(lambda o: o["method"] == "auto" or not o["dissimilarity_scale"],
                     lambda o: f"dissimilarity_scale only applies to method='auto', not {o['method']!r}"),
            Requires(lambda o: o["method"] == "auto" or o["candidates"] is None,
                     lambda o: f"candidates only applies to method='auto', not {o['method']!r}"),
        ],
        needs_data=lambda o, gm: ("rank=None searches ranks on data" if o["rank"] is None and _has_layers(gm, kind, o)
                                  else reconstruct_needs_data(o)),
        name=kind.pass_name,
    )


@dataclass
class Layer:
    node: str
    target: str
    module: nn.Module
    in_shape: tuple[int, ...]  # one sample, no batch dim
    out_shape: tuple[int, ...]
    x: torch.Tensor | None = None  # recorded calibration input
    y: torch.Tensor | None = None  # the original layer's output on it


@dataclass
class Choice:
    method: str
    k: int
    fac: Factorisation
    params: int
    macs: int
    similarity: float | None = None
    latency: float | None = None


def method_threshold(threshold: float, method: str, scale: dict[str, float]) -> float:
    """The similarity `method` must reach: its share `scale[method]` of the allowed 1 - threshold."""
    return 1 - scale.get(method, 1.0) * (1 - threshold)


def factorise(gm: fx.GraphModule, ctx: PassContext, kind: LayerKind, opts: LowRankOptions) -> PassResult:
    """Search ranks, choose a method per layer, replace the layers: the whole of a low-rank pass."""
    names = opts.method_names(kind.methods)
    scale = {m: float(f) for m, f in (opts.dissimilarity_scale or {}).items()}
    out = clone_gm(gm)
    propagate(out, ctx.example_inputs)
    layers, skipped = _layers(out, kind.layer_types, kind.skip_reason, set(opts.ignore))
    t0 = time.perf_counter()
    model_inputs: list[tuple] = []
    if opts.rank is None and layers:
        model_inputs = _record(out, layers, ctx.require_data(kind.pass_name), opts.calib_samples)
    facs = {
        (lay.node, m): kind.methods[m](lay.module, lay.in_shape, lay.out_shape, seed=ctx.seed, **opts.factorisation)
        for lay in layers
        for m in names
    }
    sims: dict[tuple[str, str, int], float] = {}
    threshold = opts.similarity
    for _round in range(8):
        chosen = {}
        for lay in layers:
            thresholds = {m: method_threshold(threshold, m, scale) for m in names}
            choice, why = _choose(
                lay, [facs[lay.node, m] for m in names], opts.rank, thresholds, opts.objective, opts.search,
                opts.step, sims,
            )
            if choice is None:
                skipped[lay.target] = why
            else:
                chosen[lay.node] = choice
                skipped.pop(lay.target, None)
        new = _apply(out, layers, chosen, ctx.example_inputs)
        if opts.model_similarity is None or opts.rank is not None or not chosen:
            break
        reached = _model_similarity(out, new, model_inputs)
        ctx.debug("%s: layer threshold %.4f -> model similarity %.4f", kind.pass_name, threshold, reached)
        if reached >= opts.model_similarity:
            break
        threshold = 1 - (1 - threshold) / 2  # halve every layer's allowed dissimilarity and search again
    seconds = time.perf_counter() - t0
    per_layer = [_layer_record(lay, chosen[lay.node]) for lay in layers if lay.node in chosen]
    record = {
        "layers": per_layer,
        "skipped": skipped,
        "search_seconds": seconds,
        "layer_similarity": threshold,
        "method_similarity": {m: method_threshold(threshold, m, scale) for m in names},
        "methods": {m: sum(r["method"] == m for r in per_layer) for m in names},
    }
    if opts.model_similarity is not None and opts.rank is None:
        record["model_similarity"] = _model_similarity(out, new, model_inputs) if chosen else 1.0
    if opts.reconstruct and chosen:
        t0 = time.perf_counter()
        batches = list(itertools.islice(ctx.require_data(kind.pass_name), opts.calib_batches))
        ends, skipped_refit = _chain_ends(new, layers, chosen)
        record["reconstructed"] = skipped_refit + refit_outputs_(new, out, ends, batches, seed=ctx.seed)
        record["reconstruct_seconds"] = time.perf_counter() - t0
    if opts.objective == "latency":
        from fxslim.latency import default_table  # onnxruntime timing: imported only when asked for

        default_table().save()
    ctx.debug("%s: %s", kind.pass_name, record)
    return PassResult(new if chosen else gm, bool(chosen), record)


def _chain_ends(new: fx.GraphModule, layers: list[Layer], chosen: dict[str, Choice]) -> tuple[dict, list]:
    """({node of `new` that gives a chain's value: the node of the layer it replaced}, skip records) for the
    chosen layers: a chain that is an nn.Sequential ends in its last layer; any other is skipped."""
    last, skipped = {}, []
    for lay in layers:
        if lay.node not in chosen:
            continue
        chain = new.get_submodule(lay.target)
        if isinstance(chain, nn.Sequential):
            last[f"{lay.target}.{len(chain) - 1}"] = lay.node
        else:
            skipped.append({"layer": lay.target, "skipped": f"{type(chain).__name__} is not a sequence of layers"})
    ends = {str(n.name): last[str(n.target)] for n in new.graph.nodes if n.op == "call_module" and n.target in last}
    return ends, skipped


def _layers(
    gm: fx.GraphModule, layer_types: tuple[type, ...], skip_reason, ignore: set[str]
) -> tuple[list[Layer], dict[str, str]]:
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    layers, skipped = [], {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        target = str(n.target)
        module = gm.get_submodule(target)
        if not isinstance(module, layer_types) or target in ignore or n.name in ignore:
            continue
        why = skip_reason(module)
        if why is None and calls[target] > 1:
            why = f"module called {calls[target]} times (shared weights)"
        src = n.args[0].meta.get("tensor_meta") if n.args and isinstance(n.args[0], fx.Node) else None
        dst = n.meta.get("tensor_meta")
        if why is None and (not hasattr(src, "shape") or not hasattr(dst, "shape")):
            why = "no recorded input/output shape"
        if why is not None:
            skipped[target] = why
            continue
        layers.append(Layer(n.name, target, module, tuple(src.shape[1:]), tuple(dst.shape[1:])))
    return layers, skipped


@torch.no_grad()
def _record(gm: fx.GraphModule, layers: list[Layer], data: Iterable, samples: int) -> list[tuple]:
    """Run `samples` calibration samples through `gm`, keeping each layer's input and output."""
    seen: dict[str, list[torch.Tensor]] = {lay.target: [] for lay in layers}
    hooks = [
        gm.get_submodule(lay.target).register_forward_pre_hook(
            lambda m, args, t=lay.target: seen[t].append(args[0].detach())
        )
        for lay in layers
    ]
    inputs, n = [], 0
    try:
        with eval_mode(gm):
            for batch in data:
                x, _ = split_batch(batch)
                take = min(samples - n, x[0].shape[0])
                x = tuple(t[:take] for t in x)
                gm(*x)
                inputs.append(x)
                n += take
                if n >= samples:
                    break
    finally:
        for h in hooks:
            h.remove()
    if not n:
        raise PassError("the calibration data gave no batch")
    for lay in layers:
        lay.x = torch.cat(seen[lay.target])
        lay.y = _eval_call(lay.module, lay.x)
    return inputs


def _eval_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with eval_mode(module):
        return module(x)


@torch.no_grad()
def _similarity(lay: Layer, fac: Factorisation, k: int, sims: dict) -> float:
    key = (lay.node, fac.method, k)
    if key not in sims:
        sims[key] = linalg.cosine_similarity(lay.y, fac.chain(k).eval()(lay.x))
    return sims[key]


def _metric(objective: str, params: int, macs: int) -> int:
    return params if objective == "memory" else macs


def _search(
    lay: Layer, fac: Factorisation, threshold: float, cap: int, search: str, step: int, sims: dict
) -> int | None:
    """Smallest rank index in 1..cap whose measured similarity reaches `threshold` (None: none does)."""
    if search == "step":
        k = 1
        while k < cap:
            if _similarity(lay, fac, k, sims) >= threshold:
                return k
            k += step
        return cap if _similarity(lay, fac, cap, sims) >= threshold else None
    # Gallop 1, 2, 4, ... to the first rank that meets the threshold, then bisect below it: the probes stay
    # near the answer (a CP fit at the cap can cost 10x one at the answer).
    lo, hi = 1, 1
    while _similarity(lay, fac, hi, sims) < threshold:
        if hi == cap:
            return None
        lo, hi = hi + 1, min(2 * hi, cap)
    while lo < hi:  # invariant: hi meets the threshold (measured), everything below lo does not
        mid = (lo + hi) // 2
        if _similarity(lay, fac, mid, sims) >= threshold:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _choose(
    lay: Layer,
    facs: list[Factorisation],
    rank,
    thresholds: dict[str, float],
    objective: str,
    search: str,
    step: int,
    sims: dict,
) -> tuple[Choice | None, str]:
    """The cheapest chain in `objective` among `facs`, each at the smallest rank meeting its method's threshold."""
    original = facs[0].original_cost()
    budget = _metric(objective, *original)
    options: list[Choice] = []
    reasons = []
    for fac in facs:
        if rank is not None:
            k = min(rank, fac.full) if isinstance(rank, int) else max(1, math.ceil(rank * fac.nominal))
            k = min(k, fac.full)
            if _metric(objective, *fac.cost(k)) >= budget:
                reasons.append(f"{fac.method}: rank {fac.ranks(k)} is not cheaper")
                continue
        else:
            cap = max((k for k in range(1, fac.full + 1) if _metric(objective, *fac.cost(k)) < budget), default=0)
            if cap == 0:
                reasons.append(f"{fac.method}: no rank is cheaper")
                continue
            k = _search(lay, fac, thresholds[fac.method], cap, search, step, sims)
            if k is None:
                reasons.append(
                    f"{fac.method}: similarity {thresholds[fac.method]:.4f} needs a rank that is not cheaper"
                )
                continue
        sim = sims.get((lay.node, fac.method, k))
        options.append(Choice(fac.method, k, fac, *fac.cost(k), similarity=sim))
    if not options:
        return None, "; ".join(reasons)
    if objective == "latency":
        from fxslim.latency import module_latency

        shape = (1, *lay.in_shape)
        base = module_latency(lay.module, shape, save=False)
        for c in options:
            c.latency = module_latency(c.fac.chain(c.k), shape, save=False)
        options = [c for c in options if c.latency < base]
        if not options:
            return None, f"no chain is faster than the original ({base * 1e6:.1f} us)"
        return min(options, key=lambda c: c.latency), ""
    return min(options, key=lambda c: (_metric(objective, c.params, c.macs), c.macs, c.params)), ""


def _apply(gm: fx.GraphModule, layers: list[Layer], chosen: dict[str, Choice], example_inputs: tuple) -> fx.GraphModule:
    if not chosen:
        return gm
    chains = {}
    for lay in layers:
        if lay.node in chosen:
            c = chosen[lay.node]
            chains[lay.node] = c.fac.chain(c.k).train(lay.module.training)
    return replace_modules(gm, chains, example_inputs, inline=True)


@torch.no_grad()
def _model_similarity(reference: fx.GraphModule, new: fx.GraphModule, inputs: list[tuple]) -> float:
    sims, weights = [], []
    for x in inputs:
        a, b = _eval_call_model(reference, x), _eval_call_model(new, x)
        sims.append(linalg.cosine_similarity(a, b))
        weights.append(x[0].shape[0])
    return float(np.average(sims, weights=weights))


def _eval_call_model(gm: fx.GraphModule, x: tuple) -> torch.Tensor:
    with eval_mode(gm):
        out = gm(*x)
    return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in out], 1)


def _layer_record(lay: Layer, c: Choice) -> dict:
    params, macs = c.fac.original_cost()
    rec = {
        "node": lay.node,
        "target": lay.target,
        "method": c.method,
        "k": c.k,
        "ranks": list(c.fac.ranks(c.k)),
        "similarity": c.similarity,
        "params_before": params,
        "params_after": c.params,
        "macs_before": macs,
        "macs_after": c.macs,
    }
    if c.latency is not None:
        rec["latency_after"] = c.latency
    return rec
