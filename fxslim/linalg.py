"""Shared linear-algebra helpers: the decompositions the low-rank passes build their chains from.

Everything here works on float64 numpy arrays (tensorly's numpy backend) and returns factors, never modules:
truncated SVD and column-pivoted QR of a matrix, Tucker-2 (HOSVD on the two channel modes, truncatable by
slicing), CP (ALS with SVD initialisation and a bounded iteration budget), tensor-train (TT-SVD) of a tensor
and of a matrix reshaped as a tensorised operator, plus the cosine similarity used to compare feature
maps. This file must never touch a graph or a module."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train, tensor_train_matrix
from tensorly.decomposition._cp import initialize_cp
from threadpoolctl import ThreadpoolController

# Small decompositions run fastest on one BLAS thread: OpenBLAS's threads fighting torch's and other
# processes for 2 cores made a 64×576 SVD take 1.7 s instead of 0.03 s here.
_BLAS = ThreadpoolController()


def one_blas_thread(fn):
    """Run `fn` with the BLAS libraries limited to one thread, on tensorly's numpy backend (whatever the
    global backend is: importing tensorly-torch switches it to pytorch)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _BLAS.limit(limits=1, user_api="blas"), tl.backend_context("numpy"):
            return fn(*args, **kwargs)

    return wrapper


@one_blas_thread
def svd(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD `mat = U diag(s) Vt`, singular values descending; truncate by slicing the first r."""
    u, s, vt = np.linalg.svd(np.asarray(mat, dtype=np.float64), full_matrices=False)
    return u, s, vt


@one_blas_thread
def pivoted_qr(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Economic column-pivoted QR `mat[:, perm] = Q R`. Truncating to the first r columns of Q and rows of R
    leaves the error ||R[r:, r:]||_F, which can only shrink as r grows (a sub-block of the previous one)."""
    q, r, perm = scipy.linalg.qr(np.asarray(mat, dtype=np.float64), mode="economic", pivoting=True)
    return q, r, perm


@dataclass
class Tucker2:
    """HOSVD of a conv kernel on its two channel modes: W = core ×0 U_out ×1 U_in (Kim et al. 2016, Eq. 5).

    The factors are complete orthonormal bases (and `core` the full projected kernel), so the rank-(r_out,
    r_in) truncation is the sliced `U_out[:, :r_out]`, `core[:r_out, :r_in]`, `U_in[:, :r_in]`: an orthogonal
    projection of W onto nested subspaces, whose error never grows with the ranks."""

    u_out: np.ndarray  # (Cout, Cout')
    core: np.ndarray  # (Cout', Cin', *kernel)
    u_in: np.ndarray  # (Cin, Cin')

    def truncate(self, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.u_out[:, :r_out], self.core[:r_out, :r_in], self.u_in[:, :r_in]


@one_blas_thread
def tucker2(kernel: np.ndarray) -> Tucker2:
    """Full Tucker-2 (HOSVD) of `kernel` (Cout, Cin, *k) along modes 0 and 1."""
    w = tl.tensor(np.asarray(kernel, dtype=np.float64))
    u_out = svd(tl.unfold(w, 0))[0]
    u_in = svd(tl.unfold(w, 1))[0]
    core = tl.tenalg.multi_mode_dot(w, [u_out.T, u_in.T], modes=[0, 1])
    return Tucker2(u_out, np.asarray(core), u_in)


@one_blas_thread
def cp(tensor: np.ndarray, rank: int, *, n_iter_max: int = 30, seed: int = 0, tol: float = 1e-10) -> list[np.ndarray]:
    """Rank-`rank` CP of `tensor`: one factor (dim_i, rank) per mode, with the weights folded into the first,
    so tensor ≈ sum_r prod_i factor_i[:, r] (Lebedev et al. 2015, Eq. 2).

    tensorly's SVD initialisation (`initialize_cp`), then at most `n_iter_max` ALS sweeps (Kolda & Bader 2009,
    Fig. 3.3) written as einsum contractions: tensorly's own `parafac` spent 35 ms per Khatri-Rao product on a
    64×64×3×3 kernel here (18 s per rank-138 fit), too slow for a rank search. CP has no truncation
    property: each rank is a new fit."""
    t = np.asarray(tensor, dtype=np.float64)
    with warnings.catch_warnings():  # ranks above a mode's size: tensorly pads the SVD init, and says so
        warnings.simplefilter("ignore", UserWarning)
        try:
            init = initialize_cp(tl.tensor(t), rank, init="svd", random_state=seed)
        except ValueError:  # tensorly's SVD init fails on some modes of size 1 with rank > 1
            init = initialize_cp(tl.tensor(t), rank, init="random", random_state=seed)
    rng = np.random.default_rng(seed)
    factors = [np.asarray(f) for f in init.factors]
    # tensorly's SVD init can return fewer columns than `rank` for tiny modes: pad with small random ones
    factors = [np.hstack([f, 1e-3 * rng.standard_normal((f.shape[0], rank - f.shape[1]))]) for f in factors]
    factors[0] = factors[0] * np.resize(np.asarray(init.weights), rank)[None, :]
    letters = "abcdefgh"[: t.ndim]
    norm = np.linalg.norm(t)
    previous = np.inf
    for _ in range(n_iter_max):
        for mode in range(t.ndim):
            others = [m for m in range(t.ndim) if m != mode]
            # MTTKRP: X_(n) (⊙_{m≠n} A_m), and the Gram of the Khatri-Rao product as a Hadamard product of Grams
            spec = f"{letters}," + ",".join(f"{letters[m]}r" for m in others) + f"->{letters[mode]}r"
            mttkrp = np.einsum(spec, t, *[factors[m] for m in others], optimize=True)
            gram = np.prod([factors[m].T @ factors[m] for m in others], axis=0)
            ridge = 1e-12 * max(np.trace(gram), 1e-300) * np.eye(rank)  # keeps rank > mode size solvable
            factors[mode] = np.linalg.solve(gram + ridge, mttkrp.T).T
        error = np.linalg.norm(cp_to_tensor(factors) - t) / max(norm, 1e-300)
        if abs(previous - error) < tol:
            break
        previous = error
    return factors


@one_blas_thread
def tt(tensor: np.ndarray, ranks: list[int]) -> list[np.ndarray]:
    """TT-SVD of `tensor` with bond ranks `ranks` (len = ndim - 1): cores (r_{i-1}, n_i, r_i), r_0 = r_d = 1
    (Oseledets 2011, Algorithm 1)."""
    return [np.asarray(c) for c in tensor_train(tl.tensor(np.asarray(tensor, dtype=np.float64)), [1, *ranks, 1])]


@one_blas_thread
def cp_to_tensor(factors: list[np.ndarray]) -> np.ndarray:
    return np.asarray(tl.cp_to_tensor((np.ones(factors[0].shape[1]), [tl.tensor(f) for f in factors])))


@one_blas_thread
def tt_to_tensor(cores: list[np.ndarray]) -> np.ndarray:
    return np.asarray(tl.tt_to_tensor([tl.tensor(c) for c in cores]))


def tt_full_ranks(shape: tuple[int, ...]) -> list[int]:
    """The bond ranks at which a TT of a tensor of `shape` is exact: min(prod(left dims), prod(right dims))."""
    return [min(math.prod(shape[: i + 1]), math.prod(shape[i + 1 :])) for i in range(len(shape) - 1)]


@one_blas_thread
def tt_matrix2(
    mat: np.ndarray, out_dims: tuple[int, int], in_dims: tuple[int, int], rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two-core TT-matrix of `mat` (o1*o2, i1*i2): W[(a,b),(c,d)] = sum_r G1[a,c,r] G2[r,b,d]
    (Novikov et al. 2015, Eq. 4 with d = 2). Returns G1 (o1, i1, r) and G2 (r, o2, i2)."""
    o1, o2 = out_dims
    i1, i2 = in_dims
    t = tl.tensor(np.asarray(mat, dtype=np.float64).reshape(o1, o2, i1, i2))
    g1, g2 = tensor_train_matrix(t, [1, rank, 1])
    return np.asarray(g1)[0], np.asarray(g2)[..., 0]


def balanced_split(n: int) -> tuple[int, int]:
    """n = a * b with a <= b and a as large as possible (a = 1 for primes)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over samples of the cosine between the flattened feature maps of one sample (the LRF paper's
    feature-map similarity); two all-zero maps count as identical."""
    a = reference.detach().reshape(reference.shape[0], -1).float()
    b = approx.detach().reshape(approx.shape[0], -1).float()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-30)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return float(cos.double().mean())
