"""lowrank_conv: exact chains at full rank (1-D/2-D, stride, padding, dilation, bias), non-increasing error
with rank, random shapes keep the output shape and lint, the similarity threshold holds per layer, the
hybrid is never costlier than a single method, grouped convs are skipped, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslim
import fxslim.latency
from fxslim import linalg
from fxslim.pass_api import PassContext
from fxslim.passes import lowrank_conv
from fxslim.passes.lowrank_conv import CPConv, TTConv, TuckerConv
from fxslim.rewrite import replace_modules

CONVS = [
    (nn.Conv1d(4, 8, 5, stride=2, padding=3, dilation=2), (2, 4, 21)),
    (nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    (nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1), bias=False), (2, 6, 11, 12)),
    (nn.Conv2d(5, 7, 3, padding="same", padding_mode="reflect"), (2, 5, 8, 8)),
]


def _seeded(conv: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv.reset_parameters()
    return conv.eval()


@pytest.mark.parametrize("cls", [TuckerConv, TTConv])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_full_rank_chain_reproduces_the_conv(cls, case):
    conv, shape = CONVS[case]
    conv = _seeded(conv, case)
    x = torch.randn(*shape)
    y = conv(x)
    fac = cls(conv, shape[1:], tuple(y.shape[1:]))
    chain = fac.chain(fac.full)
    torch.testing.assert_close(chain(x), y, atol=1e-4, rtol=0)
    assert (chain[-1].bias is None) == (conv.bias is None)


@pytest.mark.parametrize("case", range(len(CONVS)))
def test_cp_chain_is_exact_at_the_kernel_cp_rank(case):
    """CP has no finite 'full' rank to slice from: build a kernel of CP rank 3 and fit rank 3."""
    conv, shape = CONVS[case]
    conv = _seeded(conv, case)
    rng = np.random.default_rng(case)
    factors = [rng.standard_normal((d, 3)) for d in conv.weight.shape]
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(linalg.cp_to_tensor(factors)))
    x = torch.randn(*shape)
    y = conv(x)
    fac = CPConv(conv, shape[1:], tuple(y.shape[1:]), cp_iterations=300)
    chain = fac.chain(3)
    assert [type(m) for m in chain][1].__name__ == type(conv).__name__
    assert all(m.groups == 3 for m in list(chain)[1:-1])  # depthwise along each spatial dim
    torch.testing.assert_close(chain(x), y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [TuckerConv, TTConv, CPConv])
def test_reconstruction_error_does_not_grow_with_rank(cls):
    conv = _seeded(nn.Conv2d(6, 8, 3, padding=1), 3)
    fac = cls(conv, (6, 5, 5), (8, 5, 5), cp_iterations=40)
    w = conv.weight.detach().double().numpy()
    top = fac.full if cls is not CPConv else 8
    errors = [np.linalg.norm(fac.weight(k) - w) for k in range(1, top + 1)]
    assert all(b <= a + 1e-6 * errors[0] for a, b in zip(errors, errors[1:], strict=False)), errors
    if cls is not CPConv:
        assert errors[-1] < 1e-9 * errors[0]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    nd=st.sampled_from([1, 2]),
    cin=st.integers(1, 6),
    cout=st.integers(1, 6),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    method=st.sampled_from(["tucker", "cp", "tt"]),
    frac=st.floats(0.1, 1.0),
)
def test_random_shapes_keep_the_output_shape_and_lint(nd, cin, cout, k, stride, padding, dilation, bias, method, frac):
    conv_type = (nn.Conv1d, nn.Conv2d)[nd - 1]
    size = dilation * (k - 1) + 1 + stride * 2
    model = nn.Sequential(conv_type(cin, cout, k, stride, padding, dilation, bias=bias), nn.ReLU()).eval()
    x = torch.randn(2, cin, *[size] * nd)
    y = model(x)
    gm = fxslim.trace(model)
    fac = lowrank_conv.CONV_METHODS[method](model[0], tuple(x.shape[1:]), tuple(y.shape[1:]), cp_iterations=5)
    chain_k = max(1, int(frac * min(fac.full, 8)))
    new = replace_modules(gm, {"_0": fac.chain(chain_k)}, (x,), inline=True)
    new.graph.lint()
    assert new(x).shape == y.shape
    assert "_0" not in {n.name for n in new.graph.nodes}
    assert fxslim.count(new, (x,)).params == sum(p.numel() for p in fac.chain(chain_k).parameters())


class Net(nn.Module):
    def __init__(self, dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.a = conv(3, 24, 3, padding=1)
        self.bn = bn(24)
        self.b = conv(24, 24, 3, stride=2, padding=2, dilation=2)
        self.dw = conv(24, 24, 3, padding=1, groups=24)
        self.g = conv(24, 24, 1, groups=2)
        self.c = conv(24, 32, 3, padding=1)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = torch.relu(self.b(y))
        y = self.g(self.dw(y)) + y
        y = torch.relu(self.c(y))
        return self.head(y.flatten(2).mean(2))


def _smooth_data(dims: int, n: int = 96, batch: int = 32, seed: int = 0) -> list:
    """Inputs with spatial correlation (low-pass filtered noise), so that layer outputs are compressible."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 12, 12) if dims == 2 else (n, 3, 24)
    x = torch.randn(*shape, generator=g)
    pool = nn.functional.avg_pool2d if dims == 2 else nn.functional.avg_pool1d
    x = pool(x, 3, stride=1, padding=1)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _setup(dims: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = Net(dims).eval()
    data = _smooth_data(dims, seed=seed)
    x = data[0][0][:4]
    return model, fxslim.trace(model), data, x


@pytest.mark.parametrize(("dims", "method"), [(1, "auto"), (2, "tucker")])
def test_similarity_threshold_is_met_per_layer_on_the_calibration_set(dims, method):
    model, gm, data, x = _setup(dims)
    res = lowrank_conv.run(
        gm, PassContext(example_inputs=(x,), data=data), method=method, similarity=0.95, calib_samples=64
    )
    assert res.changed
    assert set(res.record["skipped"]) >= {"dw", "g"}
    assert "depthwise" in res.record["skipped"]["dw"] and "grouped" in res.record["skipped"]["g"]
    calib = torch.cat([b[0] for b in data])[:64]
    inputs = {}
    hooks = [
        getattr(model, t).register_forward_pre_hook(lambda m, a, t=t: inputs.__setitem__(t, a[0]))
        for t in ("a", "b", "c")
    ]
    model(calib)
    for h in hooks:
        h.remove()
    for rec in res.record["layers"]:
        t = rec["target"]
        chain = res.module.get_submodule(t)
        measured = linalg.cosine_similarity(getattr(model, t)(inputs[t]), chain(inputs[t]))
        assert measured >= 0.95 and abs(measured - rec["similarity"]) < 1e-5
        assert rec["macs_after"] < rec["macs_before"]
    cost0, cost1 = fxslim.count(gm, (x,)), fxslim.count(res.module, (x,))
    saved = sum(r["macs_before"] - r["macs_after"] for r in res.record["layers"])
    assert cost0.macs - cost1.macs == saved * x.shape[0]  # the record's per-sample MACs are what fxslim.count sees


def test_hybrid_is_never_costlier_than_a_single_method_and_step_search_finds_the_first_rank():
    _, gm, data, x = _setup(1, seed=1)
    ctx = PassContext(example_inputs=(x,), data=data)
    runs = {
        m: lowrank_conv.run(gm, ctx, method=m, similarity=0.9, calib_samples=64) for m in ("tucker", "cp", "tt", "auto")
    }
    macs = {m: fxslim.count(r.module, (x,)).macs for m, r in runs.items()}
    assert macs["auto"] <= min(macs["tucker"], macs["cp"], macs["tt"])
    per_layer = {m: {r["target"]: r["macs_after"] for r in res.record["layers"]} for m, res in runs.items()}
    for target, auto_macs in per_layer["auto"].items():
        for m in ("tucker", "cp", "tt"):
            assert auto_macs <= per_layer[m].get(target, float("inf"))
    # the similarity curve of a layer's output is not always monotone in the rank: the scan finds the first
    # rank that meets the threshold, bisection one whose predecessor does not
    step = lowrank_conv.run(gm, ctx, method="tucker", similarity=0.9, calib_samples=64, search="step", step=1)
    bisect = {r["target"]: r["k"] for r in runs["tucker"].record["layers"]}
    assert {r["target"] for r in step.record["layers"]} == set(bisect)
    for r in step.record["layers"]:
        assert r["similarity"] >= 0.9 and r["k"] <= bisect[r["target"]]


def test_model_similarity_budget_is_reached():
    model, gm, data, x = _setup(2, seed=2)
    ctx = PassContext(example_inputs=(x,), data=data)
    loose = lowrank_conv.run(gm, ctx, method="tucker", similarity=0.8, calib_samples=64)
    res = lowrank_conv.run(gm, ctx, method="tucker", similarity=0.8, calib_samples=64, model_similarity=0.995)
    assert res.changed and res.record["model_similarity"] >= 0.995
    assert res.record["layer_similarity"] > 0.8
    calib = torch.cat([b[0] for b in data])[:64]
    assert linalg.cosine_similarity(model(calib), res.module(calib)) >= 0.995
    assert fxslim.count(res.module, (x,)).macs >= fxslim.count(loose.module, (x,)).macs


def test_fixed_rank_leaves_input_untouched_and_exports_to_onnx(tmp_path):
    model, gm, _, x = _setup(1)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    nodes = [n.name for n in gm.graph.nodes]
    for method in ("tucker", "cp", "tt"):
        res = lowrank_conv.run(gm, PassContext(example_inputs=(x,)), method=method, rank=0.5)
        assert res.changed and {r["target"] for r in res.record["layers"]} >= {"b", "c"}
        assert all(r["macs_after"] < r["macs_before"] for r in res.record["layers"])
        err = fxslim.export_onnx(res.module, (x,), tmp_path / f"{method}.onnx")
        assert err < 1e-4
    assert [n.name for n in gm.graph.nodes] == nodes
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k])


def test_recipe_errors_name_the_pass_and_option():
    _, gm, data, x = _setup(2)
    ctx = PassContext(example_inputs=(x,), data=data)
    for bad, match in (
        (dict(method="svd"), "method='svd'"),
        (dict(objective="speed"), "objective"),
        (dict(rank=0), "rank=0"),
        (dict(rank=1.5), "rank=1.5"),
        (dict(similarity=0), "similarity"),
        (dict(method="auto", rank=4), "auto"),
        (dict(search="grid"), "search"),
    ):
        with pytest.raises(fxslim.RecipeError, match=f"lowrank_conv.*{match}"):
            lowrank_conv.run(gm, ctx, **bad)
    with pytest.raises(fxslim.PassError, match="lowrank_conv"):
        lowrank_conv.run(gm, PassContext(example_inputs=(x,)), similarity=0.9)  # a search needs data


def test_builtin_recipes_run_end_to_end():
    model, _, data, x = _setup(2)
    for recipe in ("lrf", "lrf_hybrid"):
        res = fxslim.compress(model, (x,), recipe, data=data)
        names = [r.name for r in res.report]
        assert names[-1] == "finetune" and "lowrank_conv" in names
        refit = res.report[names.index("lowrank_conv")].details["reconstructed"]  # the recipes re-fit each chain
        assert refit and all(r["rel_error_after"] <= r["rel_error_before"] + 1e-9 for r in refit)
        assert res.report[-1].macs_after < res.report[0].macs_before
        assert res.module(x).shape == model(x).shape


def test_latency_objective_uses_measured_layer_times(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSLIM_CACHE", str(tmp_path))
    _, gm, data, x = _setup(1)
    res = lowrank_conv.run(
        gm,
        PassContext(example_inputs=(x,), data=data),
        method="auto",
        objective="latency",
        similarity=0.9,
        calib_samples=32,
        ignore=["a", "b"],
    )
    table = fxslim.latency.LatencyTable(tmp_path / "latency.json")
    assert len(table) >= 2  # the original conv and at least one chain, measured and saved
    original = table.get(fxslim.latency.latency_key(gm.c, (1, 24, 12)))
    assert original is not None
    for rec in res.record["layers"]:
        assert rec["latency_after"] < original
    if not res.changed:
        assert "faster" in res.record["skipped"]["c"] or "cheaper" in res.record["skipped"]["c"]


def test_dissimilarity_scale_holds_cp_to_a_stricter_threshold_and_changes_only_cp_choices():
    _, gm, data, x = _setup(1, seed=1)
    ctx = PassContext(example_inputs=(x,), data=data)
    plain = lowrank_conv.run(gm, ctx, method="auto", similarity=0.8, calib_samples=64)
    strict = lowrank_conv.run(gm, ctx, method="auto", similarity=0.8, calib_samples=64, dissimilarity_scale={"cp": 0.5})
    assert strict.record["method_similarity"] == pytest.approx({"tucker": 0.8, "cp": 0.9, "tt": 0.8})
    assert plain.record["method_similarity"] == pytest.approx({"tucker": 0.8, "cp": 0.8, "tt": 0.8})
    assert plain.record["methods"]["cp"] > 0  # the case is only a test when the plain hybrid picks CP somewhere
    before = {r["target"]: r for r in plain.record["layers"]}
    for rec in strict.record["layers"]:
        assert rec["similarity"] >= (0.9 if rec["method"] == "cp" else 0.8)
        old = before[rec["target"]]
        if old["method"] != "cp":  # CP only became harder to pick: every other choice stands
            assert (rec["method"], rec["k"]) == (old["method"], old["k"])
        else:
            assert rec["macs_after"] >= old["macs_after"]
    assert fxslim.count(strict.module, (x,)).macs >= fxslim.count(plain.module, (x,)).macs


def test_dissimilarity_scale_errors_name_the_pass_and_the_entry():
    _, gm, data, x = _setup(2)
    ctx = PassContext(example_inputs=(x,), data=data)
    for bad, match in (
        (dict(method="tucker", dissimilarity_scale={"cp": 0.5}), "only applies to method='auto'"),
        (dict(method="auto", dissimilarity_scale={"svd": 0.5}), "names 'svd'"),
        (dict(method="auto", dissimilarity_scale={"cp": 0}), "gives 'cp' the factor 0; each must be in"),
        (dict(method="auto", dissimilarity_scale={"cp": 1.5}), "gives 'cp' the factor 1.5; each must be in"),
        (dict(method="auto", dissimilarity_scale=[0.5]), "must be None or a table method -> factor"),
    ):
        with pytest.raises(fxslim.RecipeError, match=f"lowrank_conv.*{match}"):
            lowrank_conv.run(gm, ctx, **bad)


def test_candidates_restrict_the_hybrid_and_skip_the_excluded_methods(monkeypatch):
    _, gm, data, x = _setup(1, seed=1)
    ctx = PassContext(example_inputs=(x,), data=data)
    full = lowrank_conv.run(gm, ctx, method="auto", similarity=0.8, calib_samples=64)
    assert full.record["methods"]["cp"] > 0  # the case is only a test when the full hybrid picks CP somewhere
    fits = []
    monkeypatch.setattr(lowrank_conv.CPConv, "chain", lambda self, k: fits.append(k))  # CP must never be fitted
    pair = lowrank_conv.run(gm, ctx, method="auto", similarity=0.8, calib_samples=64, candidates=["tt", "tucker"])
    assert fits == []
    assert pair.record["methods"] == {"tucker": pair.record["methods"]["tucker"], "tt": pair.record["methods"]["tt"]}
    singles = {m: lowrank_conv.run(gm, ctx, method=m, similarity=0.8, calib_samples=64) for m in ("tucker", "tt")}
    per_layer = {m: {r["target"]: r["macs_after"] for r in res.record["layers"]} for m, res in singles.items()}
    for rec in pair.record["layers"]:  # per layer: the cheaper of Tucker-2 and TT at the threshold
        assert rec["method"] in ("tucker", "tt")
        assert rec["macs_after"] == min(per_layer[m].get(rec["target"], float("inf")) for m in ("tucker", "tt"))
    one = lowrank_conv.run(gm, ctx, method="auto", similarity=0.8, calib_samples=64, candidates=["tucker"])
    assert fxslim.count(one.module, (x,)).macs == fxslim.count(singles["tucker"].module, (x,)).macs


def test_candidates_errors_name_the_pass_and_the_entry():
    _, gm, data, x = _setup(2)
    ctx = PassContext(example_inputs=(x,), data=data)
    for bad, match in (
        (dict(method="tucker", candidates=["tucker"]), "only applies to method='auto'"),
        (dict(method="auto", candidates=["svd"]), "names 'svd'"),
        (dict(method="auto", candidates=[]), "non-empty list"),
        (dict(method="auto", candidates="cp"), "candidates='cp' must be None or a list of strings"),
        (dict(method="auto", candidates=["cp", "cp"]), "twice"),
    ):
        with pytest.raises(fxslim.RecipeError, match=f"lowrank_conv.*{match}"):
            lowrank_conv.run(gm, ctx, **bad)
