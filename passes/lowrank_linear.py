"""Pass `lowrank_linear`: replace nn.Linear layers by low-rank chains (papers/lrf-2510.00062, docs/notes/methods.md).

  * "svd": Linear(in→R, no bias) · Linear(R→out): the truncated SVD W ≈ U_R S_R V_Rᵀ, √S on each side;
  * "qr": the same two linears from a column-pivoted QR, W P = Q R truncated to the first R columns/rows;
  * "tt": a two-core tensor-train matrix (in = i1·i2, out = o1·o2 split as evenly as the sizes allow):
    Linear over i2 (→ R·o2), a transpose, Linear over (R, i1) (→ o1), the bias added last.
Ranks, the similarity search, the hybrid `method="auto"` and the whole-model budget work exactly as in
`lowrank_conv`: both use the driver `fxslim.lowrank.factorise`. This file only defines the linear chains."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fxslim import linalg
from fxslim.lowrank import Factorisation, LayerKind, low_rank_pass

NAME = "lowrank_linear"


def _linear(cin: int, cout: int, weight: np.ndarray, bias: torch.Tensor | None = None) -> nn.Linear:
    new = nn.Linear(cin, cout, bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(torch.as_tensor(weight, dtype=new.weight.dtype))
        if bias is not None:
            new.bias.copy_(bias.detach())
    return new


class _LinearGeometry(Factorisation):
    def __init__(self, module: nn.Linear, in_shape, out_shape, seed: int = 0, **kw) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        self.fin, self.fout = module.in_features, module.out_features
        self.rows = math.prod(self.out_shape[:-1])  # leading dims of one sample (1 for a (N, in) input)
        self.matrix = module.weight.detach().double().numpy()
        self.full = self.nominal = min(self.fin, self.fout)
        self._factors: tuple[np.ndarray, np.ndarray] | None = None

    def _bias(self) -> int:
        return 0 if self.module.bias is None else self.fout

    def original_cost(self) -> tuple[int, int]:
        return self.fin * self.fout + self._bias(), self.rows * self.fin * self.fout

    def ranks(self, k: int) -> tuple[int]:
        return (k,)

    def _pair(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(left (out, k), right (k, in)) with W ≈ left @ right: the first k columns / rows of the full pair,
        decomposed once."""
        if self._factors is None:
            self._factors = self._full_pair()
        left, right = self._factors
        return left[:, :k], right[:k]

    def _full_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) with W = left @ right exactly, ordered so that truncating them is the method's rank-k
        approximation."""
        raise NotImplementedError

    def chain(self, k: int) -> nn.Module:
        left, right = self._pair(k)
        return nn.Sequential(_linear(self.fin, k, right), _linear(k, self.fout, left, self.module.bias))

    def weight(self, k: int) -> np.ndarray:
        left, right = self._pair(k)
        return left @ right

    def cost(self, k: int) -> tuple[int, int]:
        return k * (self.fin + self.fout) + self._bias(), self.rows * k * (self.fin + self.fout)


class SVDLinear(_LinearGeometry):
    method = "svd"

    def _full_pair(self) -> tuple[np.ndarray, np.ndarray]:
        u, s, vt = linalg.svd(self.matrix)
        root = np.sqrt(s)
        return u * root, root[:, None] * vt  # truncated: (U_k √S_k)(√S_k V_kᵀ), the best rank-k (Eckart–Young)


class QRLinear(_LinearGeometry):
    method = "qr"

    def _full_pair(self) -> tuple[np.ndarray, np.ndarray]:
        q, r, perm = linalg.pivoted_qr(self.matrix)
        right = np.empty_like(r)
        right[:, perm] = r  # W = Q R Pᵀ
        return q, right


class TTLinearModule(nn.Module):
    """y = x Wᵀ + b with W[(a,b),(c,d)] = Σ_r G1[a,c,r] G2[r,b,d] (Novikov et al. 2015, Eq. 4, d = 2), as two
    Linear layers over the reshaped input (so that cost counting and ONNX see plain MatMuls)."""

    def __init__(self, g1: np.ndarray, g2: np.ndarray, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.o1, self.i1, self.r = g1.shape
        _, self.o2, self.i2 = g2.shape
        self.first = _linear(self.i2, self.r * self.o2, g2.reshape(self.r * self.o2, self.i2))
        self.second = _linear(self.r * self.i1, self.o1, g1.transpose(0, 2, 1).reshape(self.o1, self.r * self.i1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.first(x.unflatten(-1, (self.i1, self.i2)))  # (..., i1, r*o2)
        t = t.unflatten(-1, (self.r, self.o2)).transpose(-3, -1).flatten(-2)  # (..., o2, r*i1)
        y = self.second(t).transpose(-2, -1).flatten(-2)  # (..., o1*o2)
        return y if self.bias is None else y + self.bias


class TTLinear(_LinearGeometry):
    method = "tt"

    def __init__(self, module: nn.Linear, in_shape, out_shape, seed: int = 0, **kw) -> None:
        super().__init__(module, in_shape, out_shape, seed)
        self.o = linalg.balanced_split(self.fout)
        self.i = linalg.balanced_split(self.fin)
        self.full = self.nominal = min(self.o[0] * self.i[0], self.o[1] * self.i[1])
        self._fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _cores(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._fits:
            self._fits[k] = linalg.tt_matrix2(self.matrix, self.o, self.i, k)
        return self._fits[k]

    def chain(self, k: int) -> nn.Module:
        return TTLinearModule(*self._cores(k), self.module.bias)

    def weight(self, k: int) -> np.ndarray:
        g1, g2 = self._cores(k)
        (o1, o2), (i1, i2) = self.o, self.i
        return np.einsum("acr,rbd->abcd", g1, g2).reshape(o1 * o2, i1 * i2)

    def cost(self, k: int) -> tuple[int, int]:
        (o1, o2), (i1, i2) = self.o, self.i
        params = i2 * k * o2 + k * i1 * o1 + self._bias()
        return params, self.rows * (i1 * i2 * k * o2 + o2 * k * i1 * o1)


LINEAR_METHODS: dict[str, type[Factorisation]] = {"svd": SVDLinear, "qr": QRLinear, "tt": TTLinear}


LINEAR_LAYERS = LayerKind(NAME, LINEAR_METHODS, (nn.Linear,), lambda m: None)

RUN_DOC = """method: "svd" | "qr" | "tt" | "auto" (per layer, the cheapest in `objective` meeting the threshold).
rank: None (search by similarity), an int rank, or a fraction in (0, 1] of min(in, out) (TT: of its
    full bond rank min(o1·i1, o2·i2)).
candidates: method="auto" only; the methods chosen from (default: "svd", "qr", "tt").
The other options are those of `lowrank_conv` (reconstruct: the second Linear of an SVD/QR pair is re-fit;
a TT chain is not a sequence of layers and is skipped with the reason). Record: as `lowrank_conv`'s."""

OPTIONS, run = low_rank_pass(LINEAR_LAYERS, "svd", RUN_DOC)
