"""Pass `lowrank_conv`: replace convolutions by low-rank chains (papers/lrf-2510.00062, METHODS.md "LRF").

Each Conv1d/Conv2d becomes a chain of smaller convs with the same output shape, any stride, padding,
dilation and padding mode, the bias kept on the last layer:
  * "tucker": 1×1 (Cin→R_in), k×k core (R_in→R_out, the original geometry), 1×1 (R_out→Cout);
  * "cp": 1×1 (Cin→R), one depthwise conv per spatial dim (k_h×1, then 1×k_w), 1×1 (R→Cout);
  * "tt": the TT cores of the kernel ordered (Cin, k_1, ..., Cout): 1×1, one conv per spatial dim, 1×1.
Grouped and depthwise convs are left alone with a reason in the record.

Ranks come from `rank` (an integer rank index, or a fraction of each layer's nominal rank: "uniform
rank") or from feature-map similarity: on `calib_samples` calibration samples (`ctx.data`), each layer's
smallest rank whose chain output reaches mean cosine similarity >= `similarity` with the original layer
output (on the same recorded input), found by galloping (1, 2, 4, ...) then bisection (or by a `step`
scan from rank 1) on one truncated decomposition (Tucker: re-slicing; TT: a cheap re-SVD; CP: a bounded
ALS fit per probed rank).
`method="auto"` (the hybrid) keeps, per layer, the method meeting the threshold with the lowest
`objective`: "flops" (MACs), "memory" (params) or "latency" (onnxruntime time of the layer alone on this
machine, fxslim.latency, cached). A layer is left alone when no chain is cheaper than the original in
the objective. `dissimilarity_scale` holds chosen methods to a stricter threshold in the hybrid: {"cp": 0.5}
lets a CP chain lose only half the similarity the others may (1 - s_cp = 0.5 (1 - s)), because CP chains
recover less in the one-shot fine-tune than their similarity before it suggests (docs/results/lrf.md).
`model_similarity` adds a whole-model budget: the per-layer threshold is raised until the factorised model's
output reaches that cosine similarity with the original on the calibration set.
`reconstruct=True` then re-fits the last layer of every chain (a 1×1 conv) by least squares to the original
layer's output on the first `calib_batches` batches of data, in graph order, each on the inputs the layers
re-fitted before it give (`fxslim.reconstruct.refit_outputs_`): the chain's error and the error the chains
before it leave behind are absorbed where one linear solve can absorb them.

The search/choice driver `factorise` is shared with `lowrank_linear`, which brings its own methods.
This file decides ranks and methods; the graph edit is `fxslim.rewrite.replace_modules(inline=True)`."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from fxslim import linalg
from fxslim.errors import PassError, RecipeError
from fxslim.graph.clone import clone_gm
from fxslim.graph.shape import propagate
from fxslim.pass_api import PassContext, PassResult
from fxslim.reconstruct import check_calib_batches, refit_outputs_
from fxslim.rewrite import replace_modules
from fxslim.training import split_batch

NAME = "lowrank_conv"
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


def _bias_params(module: nn.Module) -> int:
    return 0 if module.bias is None else module.bias.numel()


def _prop(k: int, full: int, total: int) -> int:
    """Rank of one mode at rank index k of `total`, proportional to that mode's full rank."""
    return max(1, min(full, math.ceil(k * full / total)))


class _ConvGeometry(Factorisation):
    def __init__(self, module: nn.Module, in_shape, out_shape, seed: int = 0, **kw: object) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        self.cin, self.cout = module.in_channels, module.out_channels
        self.kernel = tuple(module.kernel_size)
        self.nd = len(self.kernel)
        self.s_in, self.s_out = self.in_shape[1:], self.out_shape[1:]
        self.kernel_array = module.weight.detach().double().numpy()

    def _conv(
        self,
        cin: int,
        cout: int,
        weight: np.ndarray,
        *,
        dim: int | None = None,
        groups: int = 1,
        core: bool = False,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        """A conv of the chain: pointwise (dim None, not core), along spatial `dim` only, or the full core."""
        m = self.module
        conv_type = type(m) if type(m) in (nn.Conv1d, nn.Conv2d) else (nn.Conv1d, nn.Conv2d)[self.nd - 1]
        if core:
            new = conv_type(
                cin, cout, self.kernel, m.stride, m.padding, m.dilation, groups, bias is not None, m.padding_mode
            )
        elif dim is None:
            new = conv_type(cin, cout, 1, bias=bias is not None)
        else:

            def along(values, rest):
                return tuple(v if i == dim else rest for i, v in enumerate(values))

            padding = m.padding if isinstance(m.padding, str) else along(m.padding, 0)
            new = conv_type(
                cin,
                cout,
                along(self.kernel, 1),
                along(m.stride, 1),
                padding,
                along(m.dilation, 1),
                groups,
                bias is not None,
                m.padding_mode,
            )
        with torch.no_grad():
            new.weight.copy_(torch.as_tensor(weight, dtype=new.weight.dtype).reshape(new.weight.shape))
            if bias is not None:
                new.bias.copy_(bias.detach())
        return new

    def _spatial_after(self, d: int) -> int:
        """Spatial size after the per-dim convs of dims 0..d (dims beyond d keep their input size)."""
        return math.prod(self.s_out[: d + 1]) * math.prod(self.s_in[d + 1 :])

    def original_cost(self) -> tuple[int, int]:
        m = self.module
        params = m.weight.numel() + _bias_params(m)
        return params, math.prod(self.s_out) * self.cout * (self.cin // m.groups) * math.prod(self.kernel)


class TuckerConv(_ConvGeometry):
    """Tucker-2 chain (Kim et al. 2016): one HOSVD, truncated by slicing for every rank."""

    method = "tucker"

    def __init__(self, module, in_shape, out_shape, seed: int = 0, **kw) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        kk = math.prod(self.kernel)
        self.rank_out, self.rank_in = min(self.cout, self.cin * kk), min(self.cin, self.cout * kk)  # exact ranks
        self.full = self.nominal = max(self.rank_out, self.rank_in)
        self._hosvd: linalg.Tucker2 | None = None

    def ranks(self, k: int) -> tuple[int, int]:
        return _prop(k, self.rank_out, self.full), _prop(k, self.rank_in, self.full)

    def _truncated(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._hosvd is None:
            self._hosvd = linalg.tucker2(self.kernel_array)
        return self._hosvd.truncate(*self.ranks(k))

    def chain(self, k: int) -> nn.Module:
        r_out, r_in = self.ranks(k)
        u_out, core, u_in = self._truncated(k)
        return nn.Sequential(
            self._conv(self.cin, r_in, u_in.T),
            self._conv(r_in, r_out, core, core=True),
            self._conv(r_out, self.cout, u_out, bias=self.module.bias),
        )

    def weight(self, k: int) -> np.ndarray:
        u_out, core, u_in = self._truncated(k)  # W ≈ core ×0 U_out ×1 U_in  (Kim et al. 2016, Eq. 5)
        return np.einsum("oa,ab...,cb->oc...", u_out, core, u_in)

    def cost(self, k: int) -> tuple[int, int]:
        r_out, r_in = self.ranks(k)
        kk = math.prod(self.kernel)
        params = self.cin * r_in + r_in * r_out * kk + r_out * self.cout + _bias_params(self.module)
        macs = math.prod(self.s_in) * self.cin * r_in + math.prod(self.s_out) * (r_in * r_out * kk + r_out * self.cout)
        return params, macs


class CPConv(_ConvGeometry):
    """CP chain (Lebedev et al. 2015): 1×1, depthwise along each spatial dim, 1×1; one ALS fit per rank."""

    method = "cp"

    def __init__(self, module, in_shape, out_shape, seed: int = 0, cp_iterations: int = 30, **kw) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        self.nominal = max(self.cin, self.cout)
        # The search stops at max(Cin, Cout): a fit costs seconds at ranks above it (ALS is cubic in the
        # rank), where a chain of width > max(Cin, Cout) rarely saves much over Tucker-2 anyway.
        self.full = self.nominal
        self.iterations = cp_iterations
        self._fits: dict[int, list[np.ndarray]] = {}

    def ranks(self, k: int) -> tuple[int]:
        return (k,)

    def chain(self, k: int) -> nn.Module:
        if k not in self._fits:
            self._fits[k] = linalg.cp(self.kernel_array, k, n_iter_max=self.iterations, seed=self.seed)
        a, b, *spatial = self._fits[k]  # W[o, c, h, w] = sum_r A[o, r] B[c, r] C[h, r] D[w, r]  (Eq. 2)
        layers = [self._conv(self.cin, k, b.T)]
        layers += [self._conv(k, k, f.T, dim=d, groups=k) for d, f in enumerate(spatial)]
        layers.append(self._conv(k, self.cout, a, bias=self.module.bias))
        return nn.Sequential(*layers)

    def weight(self, k: int) -> np.ndarray:
        self.chain(k)
        return linalg.cp_to_tensor(self._fits[k])

    def cost(self, k: int) -> tuple[int, int]:
        params = k * (self.cin + sum(self.kernel) + self.cout) + _bias_params(self.module)
        macs = math.prod(self.s_in) * self.cin * k + math.prod(self.s_out) * k * self.cout
        macs += sum(k * kd * self._spatial_after(d) for d, kd in enumerate(self.kernel))
        return params, macs


class TTConv(_ConvGeometry):
    """TT chain: TT-SVD of the kernel ordered (Cin, k_1, ..., k_n, Cout); each core is one conv."""

    method = "tt"

    def __init__(self, module, in_shape, out_shape, seed: int = 0, **kw) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        self.tensor = np.moveaxis(self.kernel_array, 0, -1)  # (Cin, *k, Cout)
        self.bonds = linalg.tt_full_ranks(self.tensor.shape)
        self.full = self.nominal = max(self.bonds)
        self._fits: dict[int, list[np.ndarray]] = {}

    def ranks(self, k: int) -> tuple[int, ...]:
        return tuple(_prop(k, b, self.full) for b in self.bonds)

    def chain(self, k: int) -> nn.Module:
        if k not in self._fits:
            self._fits[k] = linalg.tt(self.tensor, list(self.ranks(k)))
        first, *middle, last = self._fits[k]  # W[c, h, w, o] = G0[c] G1[h] G2[w] G3[o]  (Oseledets 2011, Eq. 1.2)
        layers = [self._conv(self.cin, first.shape[2], first[0].T)]
        for d, g in enumerate(middle):  # g: (r_prev, k_d, r_next) -> weight (r_next, r_prev, k_d)
            layers.append(self._conv(g.shape[0], g.shape[2], g.transpose(2, 0, 1), dim=d))
        layers.append(self._conv(last.shape[0], self.cout, last[:, :, 0].T, bias=self.module.bias))
        return nn.Sequential(*layers)

    def weight(self, k: int) -> np.ndarray:
        self.chain(k)
        return np.moveaxis(linalg.tt_to_tensor(self._fits[k]), -1, 0)

    def cost(self, k: int) -> tuple[int, int]:
        b = self.ranks(k)
        params = self.cin * b[0] + sum(b[d] * kd * b[d + 1] for d, kd in enumerate(self.kernel))
        params += b[-1] * self.cout + _bias_params(self.module)
        macs = math.prod(self.s_in) * self.cin * b[0] + math.prod(self.s_out) * b[-1] * self.cout
        macs += sum(b[d] * kd * b[d + 1] * self._spatial_after(d) for d, kd in enumerate(self.kernel))
        return params, macs


CONV_METHODS: dict[str, type[Factorisation]] = {"tucker": TuckerConv, "cp": CPConv, "tt": TTConv}


def conv_skip_reason(module: nn.Module) -> str | None:
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return f"{type(module).__name__} is not a Conv1d/Conv2d"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels == module.out_channels else "grouped"
        return f"{kind} conv (groups={module.groups}): factorising it would mix its groups"
    return None


def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    method: str = "tucker",
    rank: int | float | None = None,
    similarity: float = 0.92,
    objective: str = "flops",
    search: str = "bisect",
    step: int = 1,
    calib_samples: int = 1000,
    model_similarity: float | None = None,
    cp_iterations: int = 30,
    dissimilarity_scale: dict[str, float] | None = None,
    candidates: list[str] | tuple[str, ...] | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    reconstruct: bool = False,
    calib_batches: int = 8,
) -> PassResult:
    """method: "tucker" | "cp" | "tt" | "auto" (per layer, the cheapest in `objective` of those meeting the
        similarity threshold).
    rank: None (search by similarity); an int rank index (Tucker: the larger of the two channel ranks,
        the other scaled alike; CP: the rank; TT: the largest bond rank); a float in (0, 1]: that fraction
        of each layer's nominal rank (max(Cin, Cout) for Tucker and CP, the largest full TT bond).
    similarity: per-layer mean cosine similarity of chain vs original output on the calibration set.
    objective: "flops" | "memory" | "latency" (onnxruntime, one thread, cached in fxslim.latency).
    search: "bisect" (on the similarity curve) or "step" (rank 1, 1 + step, ... as in the paper).
    calib_samples: calibration samples taken from ctx.data for the search.
    model_similarity: optional whole-model budget (cosine of the model outputs on the calibration set).
    cp_iterations: ALS sweeps per CP fit.
    dissimilarity_scale: method="auto" only; per method a factor in (0, 1] on its allowed 1 - similarity
        (methods not named keep 1).
    candidates: method="auto" only; the methods the hybrid chooses from (default: all three). The LRF paper
        lets users exclude methods this way, e.g. CP, the slowest to fit and the one that recovers least in
        fine-tuning; an excluded method is never decomposed or searched.
    ignore: module names (targets) left alone.
    reconstruct: re-fit the last layer of every chain by least squares to the original layer's output, on
        the first `calib_batches` batches of data (needs data).

    record: {"layers": [{node, target, method, ranks, similarity, params/macs before/after, ...}],
    "skipped": {target: reason}, "search_seconds": float, "layer_similarity": float}; with reconstruct
    also "reconstructed" (per chain: relative output error before/after the re-fit, or why it was skipped)
    and "reconstruct_seconds"."""
    return factorise(
        gm,
        ctx,
        pass_name=NAME,
        methods=CONV_METHODS,
        skip_reason=conv_skip_reason,
        layer_types=(nn.Conv1d, nn.Conv2d),
        method=method,
        rank=rank,
        similarity=similarity,
        objective=objective,
        search=search,
        step=step,
        calib_samples=calib_samples,
        model_similarity=model_similarity,
        ignore=ignore,
        options={"cp_iterations": cp_iterations},
        dissimilarity_scale=dissimilarity_scale,
        candidates=candidates,
        reconstruct=reconstruct,
        calib_batches=calib_batches,
    )


# ---------------------------------------------------------------------------------------------------------
# The driver shared with lowrank_linear.


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


def check_options(
    pass_name: str,
    methods: Iterable[str],
    method: str,
    rank,
    similarity,
    objective: str,
    search: str,
    step: int,
    calib_samples: int,
    model_similarity,
) -> None:
    valid = [*methods, "auto"]
    if method not in valid:
        raise RecipeError(f"pass {pass_name!r}: method={method!r}; valid: {', '.join(valid)}")
    if objective not in OBJECTIVES:
        raise RecipeError(f"pass {pass_name!r}: objective={objective!r}; valid: {', '.join(OBJECTIVES)}")
    if search not in SEARCHES:
        raise RecipeError(f"pass {pass_name!r}: search={search!r}; valid: {', '.join(SEARCHES)}")
    if rank is not None:
        ok = (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1) or (
            isinstance(rank, float) and 0 < rank <= 1
        )
        if not ok:
            raise RecipeError(f"pass {pass_name!r}: rank={rank!r} must be an int >= 1 or a fraction in (0, 1]")
        if method == "auto":
            raise RecipeError(f"pass {pass_name!r}: method='auto' chooses by similarity; set rank=None")
    if not (isinstance(similarity, (int, float)) and 0 < similarity <= 1):
        raise RecipeError(f"pass {pass_name!r}: similarity={similarity!r} must be in (0, 1]")
    if model_similarity is not None and not (isinstance(model_similarity, (int, float)) and 0 < model_similarity <= 1):
        raise RecipeError(f"pass {pass_name!r}: model_similarity={model_similarity!r} must be in (0, 1] or None")
    if not (isinstance(step, int) and step >= 1):
        raise RecipeError(f"pass {pass_name!r}: step={step!r} must be an int >= 1")
    if not (isinstance(calib_samples, int) and calib_samples >= 1):
        raise RecipeError(f"pass {pass_name!r}: calib_samples={calib_samples!r} must be an int >= 1")


def check_dissimilarity_scale(pass_name: str, methods: Iterable[str], method: str, scale) -> dict[str, float]:
    """The validated per-method factors on the allowed dissimilarity (empty when none are given)."""
    if not scale:
        return {}
    if method != "auto":
        raise RecipeError(f"pass {pass_name!r}: dissimilarity_scale only applies to method='auto', not {method!r}")
    if not isinstance(scale, dict):
        raise RecipeError(f"pass {pass_name!r}: dissimilarity_scale={scale!r} must be a table method -> factor")
    for name, factor in scale.items():
        if name not in methods:
            raise RecipeError(f"pass {pass_name!r}: dissimilarity_scale names {name!r}; valid: {', '.join(methods)}")
        if isinstance(factor, bool) or not (isinstance(factor, (int, float)) and 0 < factor <= 1):
            raise RecipeError(f"pass {pass_name!r}: dissimilarity_scale[{name!r}]={factor!r} must be in (0, 1]")
    return {name: float(factor) for name, factor in scale.items()}


def check_candidates(pass_name: str, methods: Iterable[str], method: str, candidates) -> list[str]:
    """The methods to try per layer: `[method]`, or for method="auto" `candidates` (validated) or all `methods`."""
    methods = list(methods)
    if candidates is None:
        return methods if method == "auto" else [method]
    if method != "auto":
        raise RecipeError(f"pass {pass_name!r}: candidates only applies to method='auto', not {method!r}")
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) or not candidates:
        raise RecipeError(f"pass {pass_name!r}: candidates={candidates!r} must be a non-empty list of methods")
    for name in candidates:
        if name not in methods:
            raise RecipeError(f"pass {pass_name!r}: candidates names {name!r}; valid: {', '.join(methods)}")
    if len(set(candidates)) != len(candidates):
        raise RecipeError(f"pass {pass_name!r}: candidates={list(candidates)!r} names a method twice")
    return [m for m in methods if m in candidates]


def method_threshold(threshold: float, method: str, scale: dict[str, float]) -> float:
    """The similarity `method` must reach: its share `scale[method]` of the allowed 1 - threshold."""
    return 1 - scale.get(method, 1.0) * (1 - threshold)


def factorise(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    pass_name: str,
    methods: dict[str, type[Factorisation]],
    skip_reason: Callable[[nn.Module], str | None],
    layer_types: tuple[type, ...],
    method: str,
    rank,
    similarity: float,
    objective: str,
    search: str,
    step: int,
    calib_samples: int,
    model_similarity: float | None,
    ignore: Iterable[str],
    options: dict,
    dissimilarity_scale: dict[str, float] | None = None,
    candidates: Iterable[str] | None = None,
    reconstruct: bool = False,
    calib_batches: int = 8,
) -> PassResult:
    check_options(
        pass_name, methods, method, rank, similarity, objective, search, step, calib_samples, model_similarity
    )
    names = check_candidates(pass_name, methods, method, candidates)
    check_calib_batches(f"pass {pass_name!r}", calib_batches)
    refit_data = ctx.require_data(pass_name) if reconstruct else None
    scale = check_dissimilarity_scale(pass_name, methods, method, dissimilarity_scale)
    out = clone_gm(gm)
    propagate(out, ctx.example_inputs)
    layers, skipped = _layers(out, layer_types, skip_reason, set(ignore))
    t0 = time.perf_counter()
    model_inputs: list[tuple] = []
    if rank is None and layers:
        model_inputs = _record(out, layers, ctx.require_data(pass_name), calib_samples)
    facs = {
        (lay.node, m): methods[m](lay.module, lay.in_shape, lay.out_shape, seed=ctx.seed, **options)
        for lay in layers
        for m in names
    }
    sims: dict[tuple[str, str, int], float] = {}
    threshold = similarity
    for _round in range(8):
        chosen = {}
        for lay in layers:
            thresholds = {m: method_threshold(threshold, m, scale) for m in names}
            choice, why = _choose(
                lay, [facs[lay.node, m] for m in names], rank, thresholds, objective, search, step, sims
            )
            if choice is None:
                skipped[lay.target] = why
            else:
                chosen[lay.node] = choice
                skipped.pop(lay.target, None)
        new = _apply(out, layers, chosen, ctx.example_inputs)
        if model_similarity is None or rank is not None or not chosen:
            break
        reached = _model_similarity(out, new, model_inputs)
        ctx.debug("%s: layer threshold %.4f -> model similarity %.4f", pass_name, threshold, reached)
        if reached >= model_similarity:
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
    if model_similarity is not None and rank is None:
        record["model_similarity"] = _model_similarity(out, new, model_inputs) if chosen else 1.0
    if refit_data is not None and chosen:
        t0 = time.perf_counter()
        batches = list(itertools.islice(refit_data, calib_batches))
        ends, skipped_refit = _chain_ends(new, layers, chosen)
        record["reconstructed"] = skipped_refit + refit_outputs_(new, out, ends, batches, seed=ctx.seed)
        record["reconstruct_seconds"] = time.perf_counter() - t0
    if objective == "latency":
        from fxslim.latency import default_table

        default_table().save()
    ctx.debug("%s: %s", pass_name, record)
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
    was_training = gm.training
    gm.eval()
    inputs, n = [], 0
    try:
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
        gm.train(was_training)
    if not n:
        raise PassError("the calibration data gave no batch")
    for lay in layers:
        lay.x = torch.cat(seen[lay.target])
        lay.y = _eval_call(lay.module, lay.x)
    return inputs


def _eval_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    module.eval()
    try:
        return module(x)
    finally:
        module.train(was)


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
    was = gm.training
    gm.eval()
    try:
        out = gm(*x)
    finally:
        gm.train(was)
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
