"""lowrank_linear: SVD / QR / TT chains exact at full rank (any leading dims, with and without bias), error
non-increasing with rank, random shapes keep the output shape and lint, similarity per layer, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslim
from fxslim import linalg
from fxslim.pass_api import PassContext
from fxslim.passes import lowrank_linear
from fxslim.passes.lowrank_linear import LINEAR_METHODS, QRLinear, SVDLinear, TTLinear


@pytest.mark.parametrize("cls", [SVDLinear, QRLinear, TTLinear])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_chain_reproduces_the_linear(cls, bias):
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=bias)
    x = torch.randn(3, 5, 12)  # leading dims beyond the batch
    fac = cls(lin, (5, 12), (5, 10))
    torch.testing.assert_close(fac.chain(fac.full)(x), lin(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [SVDLinear, QRLinear, TTLinear])
def test_reconstruction_error_does_not_grow_with_rank(cls):
    torch.manual_seed(1)
    lin = nn.Linear(24, 18)
    fac = cls(lin, (24,), (18,))
    w = lin.weight.detach().double().numpy()
    errors = [np.linalg.norm(fac.weight(k) - w) for k in range(1, fac.full + 1)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-9


def test_svd_is_the_best_rank_k_approximation():
    torch.manual_seed(2)
    lin = nn.Linear(16, 16)
    w = lin.weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    for k in (1, 4, 9):  # Eckart–Young: the error is the norm of the discarded singular values
        err = np.linalg.norm(SVDLinear(lin, (16,), (16,)).weight(k) - w)
        assert err == pytest.approx(np.sqrt((s[k:] ** 2).sum()), rel=1e-9)
        assert err <= np.linalg.norm(QRLinear(lin, (16,), (16,)).weight(k) - w) + 1e-12


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    fin=st.integers(1, 40),
    fout=st.integers(1, 40),
    lead=st.integers(0, 2),
    bias=st.booleans(),
    method=st.sampled_from(["svd", "qr", "tt"]),
    frac=st.floats(0.05, 1.0),
)
def test_random_shapes_keep_the_output_shape_and_lint(fin, fout, lead, bias, method, frac):
    model = nn.Sequential(nn.Linear(fin, fout, bias=bias), nn.ReLU()).eval()
    x = torch.randn(2, *[3] * lead, fin)
    y = model(x)
    gm = fxslim.trace(model)
    fac = LINEAR_METHODS[method](model[0], tuple(x.shape[1:]), tuple(y.shape[1:]))
    k = max(1, int(frac * fac.full))
    assert fac.chain(k)(x).shape == model[0](x).shape
    res = lowrank_linear.run(gm, PassContext(example_inputs=(x,)), method=method, rank=frac)
    res.module.graph.lint()
    assert res.module(x).shape == y.shape
    if res.changed:
        rec = res.record["layers"][0]
        assert rec["params_after"] < rec["params_before"] or rec["macs_after"] < rec["macs_before"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 48)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _low_rank_mlp(seed: int = 0) -> MLP:
    """Weights of (numerical) rank 8 plus a little noise: each layer has a cheap, accurate factorisation."""
    torch.manual_seed(seed)
    model = MLP().eval()
    with torch.no_grad():
        for lin in (model.fc1, model.fc2):
            out, inp = lin.weight.shape
            lin.weight.copy_(torch.randn(out, 8) @ torch.randn(8, inp) / 8 + 0.01 * torch.randn(out, inp))
    return model


def test_similarity_threshold_is_met_and_hybrid_is_cheapest(tmp_path):
    model = _low_rank_mlp()
    data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    x = data[0][0][:4]
    gm = fxslim.trace(model)
    ctx = PassContext(example_inputs=(x,), data=data)
    runs = {
        m: lowrank_linear.run(gm, ctx, method=m, similarity=0.97, calib_samples=96) for m in ("svd", "qr", "tt", "auto")
    }
    calib = torch.cat([b[0] for b in data])
    h1 = torch.relu(model.fc1(calib))
    inputs = {"fc1": calib, "fc2": h1, "fc3": torch.relu(model.fc2(h1))}
    for res in runs.values():
        for rec in res.record["layers"]:
            t = rec["target"]
            got = linalg.cosine_similarity(getattr(model, t)(inputs[t]), res.module.get_submodule(t)(inputs[t]))
            assert got >= 0.97
    svd_layers = {r["target"]: r for r in runs["svd"].record["layers"]}
    assert {"fc1", "fc2"} <= set(svd_layers) and svd_layers["fc1"]["k"] <= 9
    macs = {m: fxslim.count(r.module, (x,)).macs for m, r in runs.items()}
    assert macs["auto"] <= min(macs["svd"], macs["qr"], macs["tt"]) < fxslim.count(gm, (x,)).macs
    for m, res in runs.items():
        assert fxslim.export_onnx(res.module, (x,), tmp_path / f"{m}.onnx") < 1e-4
    # candidates: the hybrid over SVD and QR only picks, per layer, the cheaper of the two
    pair = lowrank_linear.run(gm, ctx, method="auto", similarity=0.97, calib_samples=96, candidates=["qr", "svd"])
    assert set(pair.record["methods"]) == {"svd", "qr"}
    cheapest = {r["target"]: min(single["macs_after"] for m in ("svd", "qr") for single in runs[m].record["layers"]
                                 if single["target"] == r["target"]) for r in pair.record["layers"]}
    assert {r["target"]: r["macs_after"] for r in pair.record["layers"]} == cheapest


def test_tt_linear_on_the_graph_is_exact_at_the_weight_tt_rank_and_exports(tmp_path):
    model = _low_rank_mlp(1)
    rng = np.random.default_rng(1)
    g1, g2 = rng.standard_normal((8, 8, 2)), rng.standard_normal((2, 12, 8))  # 96 = 8·12 outputs, 64 = 8·8 inputs
    with torch.no_grad():
        model.fc1.weight.copy_(torch.as_tensor(np.einsum("acr,rbd->abcd", g1, g2).reshape(96, 64)))
    x = torch.randn(4, 64)
    res = lowrank_linear.run(
        fxslim.trace(model), PassContext(example_inputs=(x,)), method="tt", rank=2, ignore=["fc2", "fc3"]
    )
    assert [(r["target"], r["k"]) for r in res.record["layers"]] == [("fc1", 2)]
    torch.testing.assert_close(res.module(x), model(x), atol=1e-4, rtol=1e-4)
    assert fxslim.count(res.module, (x,)).params < fxslim.count(model, (x,)).params
    assert fxslim.export_onnx(res.module, (x,), tmp_path / "tt.onnx") < 1e-4


def test_bad_options_raise_recipe_errors():
    gm = fxslim.trace(MLP())
    ctx = PassContext(example_inputs=(torch.randn(2, 64),))
    with pytest.raises(fxslim.RecipeError, match="lowrank_linear.*method='tucker'"):
        lowrank_linear.run(gm, ctx, method="tucker", rank=2)
    with pytest.raises(fxslim.RecipeError, match="lowrank_linear.*step"):
        lowrank_linear.run(gm, ctx, rank=2, step=0)
