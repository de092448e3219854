"""fxslim.linalg: Tucker-2 truncation is a projection (error non-increasing, exact at full rank), pivoted QR
reconstructs, CP recovers a tensor of known CP rank, TT is exact at full bond ranks, cosine similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxslim import linalg


def test_tucker2_truncation_error_shrinks_and_vanishes_at_full_rank():
    w = np.random.default_rng(0).standard_normal((8, 6, 3, 3))
    t = linalg.tucker2(w)
    errors = []
    for r in range(1, 7):
        u_out, core, u_in = t.truncate(min(r, 8), r)
        errors.append(np.linalg.norm(np.einsum("oa,ab...,cb->oc...", u_out, core, u_in) - w))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    u_out, core, u_in = t.truncate(8, 6)
    assert np.allclose(np.einsum("oa,ab...,cb->oc...", u_out, core, u_in), w)


def test_pivoted_qr_reconstructs():
    m = np.random.default_rng(1).standard_normal((7, 11))
    q, r, perm = linalg.pivoted_qr(m)
    assert np.allclose(q @ r, m[:, perm])
    assert np.all(np.diff(np.abs(np.diag(r))) <= 1e-12)  # pivoting orders |R_ii| descending


def test_cp_recovers_a_rank_3_tensor():
    rng = np.random.default_rng(2)
    factors = [rng.standard_normal((d, 3)) for d in (5, 4, 3, 3)]
    t = linalg.cp_to_tensor(factors)
    fit = linalg.cp(t, 3, n_iter_max=300)
    assert np.linalg.norm(linalg.cp_to_tensor(fit) - t) < 1e-5 * np.linalg.norm(t)


def test_tt_is_exact_at_full_bond_ranks():
    t = np.random.default_rng(3).standard_normal((4, 3, 3, 5))
    ranks = linalg.tt_full_ranks(t.shape)
    assert ranks == [4, 12, 5]
    assert np.allclose(linalg.tt_to_tensor(linalg.tt(t, ranks)), t)


def test_tt_matrix2_and_balanced_split():
    assert linalg.balanced_split(96) == (8, 12) and linalg.balanced_split(13) == (1, 13)
    m = np.random.default_rng(4).standard_normal((6, 8))
    g1, g2 = linalg.tt_matrix2(m, (2, 3), (2, 4), 4)  # full rank min(2·2, 3·4) = 4
    assert np.allclose(np.einsum("acr,rbd->abcd", g1, g2).reshape(6, 8), m)


def test_cosine_similarity():
    a = torch.randn(4, 3, 5)
    assert linalg.cosine_similarity(a, a) == pytest.approx(1.0)
    assert linalg.cosine_similarity(a, 2 * a) == pytest.approx(1.0)
    assert linalg.cosine_similarity(a, -a) == pytest.approx(-1.0)
    z = torch.zeros(2, 6)
    assert linalg.cosine_similarity(z, z) == 1.0
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert linalg.cosine_similarity(b, c) == pytest.approx(0.5)  # per-sample cosines 0 and 1, averaged


def test_decompositions_use_numpy_whatever_the_global_tensorly_backend():
    import tensorly as tl

    w = np.random.default_rng(5).standard_normal((4, 3, 3, 3))
    with tl.backend_context("pytorch"):  # what importing tensorly-torch does globally
        t = linalg.tucker2(w)
        assert np.allclose(np.einsum("oa,ab...,cb->oc...", *t.truncate(4, 3)[:2], t.truncate(4, 3)[2]), w)
        assert linalg.cp_to_tensor(linalg.cp(w, 2, n_iter_max=3)).shape == w.shape
