"""Pass `lowrank_conv`: replace convolutions by low-rank chains (papers/lrf-2510.00062, docs/notes/methods.md).

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

This file holds the conv factorisations; the rank search and per-layer choice are the driver
`fxslim.lowrank.factorise`, shared with `lowrank_linear`."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fxslim import linalg
from fxslim.lowrank import (
    Factorisation,
    LayerKind,
    bias_params,
    low_rank_pass,
    proportional_rank,
)
from fxslim.options import Option

NAME = "lowrank_conv"


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
        params = m.weight.numel() + bias_params(m)
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
        return proportional_rank(k, self.rank_out, self.full), proportional_rank(k, self.rank_in, self.full)

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
        params = self.cin * r_in + r_in * r_out * kk + r_out * self.cout + bias_params(self.module)
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
        params = k * (self.cin + sum(self.kernel) + self.cout) + bias_params(self.module)
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
        return tuple(proportional_rank(k, b, self.full) for b in self.bonds)

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
        params += b[-1] * self.cout + bias_params(self.module)
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


CONV_LAYERS = LayerKind(NAME, CONV_METHODS, (nn.Conv1d, nn.Conv2d), conv_skip_reason)

RUN_DOC = """method: "tucker" | "cp" | "tt" | "auto" (per layer, the cheapest in `objective` of those meeting the
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

OPTIONS, run = low_rank_pass(
    CONV_LAYERS, "tucker", RUN_DOC, {Option("cp_iterations", int, "ALS sweeps per CP fit", range=">= 1"): 30}
)
