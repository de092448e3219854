"""asr: γ = 1 on a dense model; exact restoration of a known per-channel attenuation; shrinkage sends γ to 1
for collapsed channels; the placement warning (a scale before a re-estimated BN is divided out); layer-wise
mode; composition with prune_channels and with ONNX export."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxslim
from fxslim.dense_state import DENSE_META
from fxslim.errors import PassError, RecipeError
from fxslim.export import export_onnx
from fxslim.pass_api import PassContext
from fxslim.passes import asr, bn_recalibrate, magnitude_prune
from fxslim.recipe import load_recipe


class Plain(nn.Module):
    """No BatchNorm: a conv whose output rows we attenuate by hand, then a conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(2))


class BNNet(nn.Module):
    """conv-BN-ReLU twice, a residual add, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(h.mean((2, 3)))


def batches(shape, n: int = 4, size: int = 64, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def trained_bn_net() -> fx.GraphModule:
    """BNNet whose BN statistics describe the data (as a trained model's do)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(BNNet())
    ctx = PassContext((torch.zeros(1, 3, 6, 6),), data=batches((3, 6, 6), seed=1))
    return bn_recalibrate.run(gm, ctx).module.eval()


def attenuated(scale: torch.Tensor) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(dense, damaged): the damaged copy has conv1's output row i multiplied by scale[i]."""
    torch.manual_seed(0)
    dense = fx.symbolic_trace(Plain().eval())
    damaged = copy.deepcopy(dense)
    with torch.no_grad():
        damaged.conv1.weight.mul_(scale.view(-1, 1, 1))
        damaged.conv1.bias.mul_(scale)
    return dense, damaged


SCALE = torch.tensor([1.0, 0.5, 0.25, 0.8, 0.6, 0.9, 0.3, 0.7])
X1 = batches((3, 20))


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ctx_for(reference, data) -> PassContext:
    return PassContext(example_inputs=(data[0][0][:2],), data=data, reference=reference)


def outputs(gm, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(x) for x, _ in data])


def test_dense_model_as_pruned_gives_gamma_one_and_changes_nothing() -> None:
    gm = trained_bn_net()
    data = batches((3, 6, 6))
    for placement in asr.PLACEMENTS:
        res = asr.run(gm, ctx_for(gm, data), placement=placement, recalibrate_bn=False)
        for layer, ch in res.record["channels"].items():
            torch.testing.assert_close(
                f64(ch["gamma"]), torch.ones(len(ch["gamma"]), dtype=torch.float64), atol=1e-6, rtol=0, msg=layer
            )
        assert set(res.record["channels"]) == {"conv1", "conv2", "fc"}
        torch.testing.assert_close(outputs(res.module, data), outputs(gm, data), atol=1e-6, rtol=0)


def test_known_attenuation_is_undone_exactly_without_shrinkage() -> None:
    dense, damaged = attenuated(SCALE)
    res = asr.run(damaged, ctx_for(dense, X1), shrinkage=False, recalibrate_bn=False)

    torch.testing.assert_close(f64(res.record["channels"]["conv1"]["gamma"]), 1 / SCALE.double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.module.conv1.weight, dense.conv1.weight, rtol=1e-4, atol=1e-6)
    x = torch.cat([b[0] for b in X1])
    v_dense = asr.channel_variance(dense.conv1(x), 1)
    v_repaired = asr.channel_variance(res.module.conv1(x), 1)
    torch.testing.assert_close(v_repaired, v_dense, rtol=1e-4, atol=0)
    # layers behind the repaired one now see the dense signal again: their γ is 1, the whole output matches
    torch.testing.assert_close(
        f64(res.record["channels"]["conv2"]["gamma"]), torch.ones(8, dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(outputs(res.module, X1), outputs(dense, X1), rtol=1e-4, atol=1e-5)
    # the damaged input module is left as it was
    assert not torch.allclose(damaged.conv1.weight, dense.conv1.weight)


def test_shrinkage_follows_the_formula_with_data_driven_lambda() -> None:
    dense, damaged = attenuated(SCALE)
    res = asr.run(damaged, ctx_for(dense, X1), recalibrate_bn=False)
    ch = res.record["channels"]["conv1"]
    v_d, v_p = f64(ch["v_dense"]), f64(ch["v_pruned"])
    lam = 0.05 * v_p.median()
    s = v_p / (v_p + lam)
    want = s * torch.sqrt(v_d / v_p) + 1 - s
    torch.testing.assert_close(f64(ch["gamma"]), want, rtol=1e-9, atol=0)
    g = f64(ch["gamma"])
    assert (g <= 1 / SCALE.double() + 1e-12).all()  # every correction shrunk toward 1, none overshoots
    assert (g[1:] > 1.1).all() and g[0] == pytest.approx(1.0)


def test_shrinkage_sends_gamma_to_one_for_collapsed_channels() -> None:
    scale = SCALE.clone()
    scale[[1, 6]] = 1e-4  # two channels nearly silenced by the "pruning"
    dense, damaged = attenuated(scale)
    shrunk = asr.run(damaged, ctx_for(dense, X1), recalibrate_bn=False).record
    naive = asr.run(damaged, ctx_for(dense, X1), recalibrate_bn=False, shrinkage=False).record
    g = f64(shrunk["channels"]["conv1"]["gamma"])
    g_naive = f64(naive["channels"]["conv1"]["gamma"])

    assert (g[[1, 6]] - 1).abs().max() < 0.01  # collapsed: left alone
    assert g_naive[[1, 6]].min() > 5000  # naive matching would blow them up ×10^4
    healthy = [0, 2, 3, 4, 5, 7]
    full = 1 / scale[healthy].double()
    assert (g[healthy] >= 1 + 0.75 * (full - 1) - 1e-12).all()  # healthy channels keep most of their correction
    assert shrunk["layers"]["conv1"]["shrunk"] == 2
    # an explicit λ above every channel's variance shrinks every correction toward 1
    v_max = max(shrunk["channels"]["conv1"]["v_pruned"])
    big = asr.run(damaged, ctx_for(dense, X1), recalibrate_bn=False, lam=1e6 * v_max).record
    assert (f64(big["channels"]["conv1"]["gamma"]) - 1).abs().max() < 1e-4


def test_layer_mode_applies_one_scalar_per_layer() -> None:
    dense, damaged = attenuated(SCALE)
    ch = asr.run(damaged, ctx_for(dense, X1), mode="layer", recalibrate_bn=False).record["channels"]["conv1"]
    g = f64(ch["gamma"])
    want = torch.sqrt(f64(ch["v_dense"]).mean() / f64(ch["v_pruned"]).mean())
    torch.testing.assert_close(g, want.expand(8), rtol=1e-9, atol=0)


@settings(max_examples=25, derandomize=True, deadline=None)
@given(v=st.lists(st.tuples(st.floats(1e-6, 1e3), st.floats(1e-6, 1e3)), min_size=2, max_size=16))
def test_shrunk_gamma_lies_between_one_and_the_full_correction(v) -> None:
    v_d = f64([a for a, _ in v])
    v_p = f64([b for _, b in v])
    g, s = asr.gamma(v_d, v_p)
    g_star, _ = asr.gamma(v_d, v_p, shrinkage=False)
    lo, hi = torch.minimum(g_star, torch.ones_like(g)), torch.maximum(g_star, torch.ones_like(g))
    assert ((g >= lo - 1e-12) & (g <= hi + 1e-12)).all()
    assert ((s > 0) & (s < 1)).all()


def pruned_bn_net(sparsity: float = 0.85):
    gm = trained_bn_net()
    data = batches((3, 6, 6), n=4, size=64, seed=2)
    ctx = ctx_for(gm, data)
    return magnitude_prune.run(gm, ctx, sparsity=sparsity).module, ctx, data


def test_placement_warning_a_scale_before_a_reestimated_bn_is_cancelled() -> None:
    pruned, ctx, data = pruned_bn_net()
    bn_only = bn_recalibrate.run(pruned, ctx, calib_batches=len(data)).module
    conv = asr.run(pruned, ctx, placement="conv", ignore=["fc"], calib_samples=256)
    g = f64(conv.record["channels"]["conv1"]["gamma"])
    assert (g - 1).abs().max() > 0.1  # the conv really was rescaled ...
    assert not torch.allclose(conv.module.conv1.weight, pruned.conv1.weight)
    # ... and the re-estimated BN divided it out again: the same function as BN-only recalibration
    residual = (outputs(conv.module, data) - outputs(bn_only, data)).abs().max()
    assert residual < 1e-3

    # placement "bn" applies the same kind of correction where the BN does not undo it
    bn = asr.run(pruned, ctx, placement="bn", ignore=["fc"], calib_samples=256)
    assert bn.record["layers"]["conv1"]["applied_at"] == "bn1"
    assert (outputs(bn.module, data) - outputs(bn_only, data)).abs().max() > 20 * residual
    # and without shrinkage it is exactly BN-only recalibration (full per-channel variance matching)
    naive = asr.run(pruned, ctx, placement="bn", ignore=["fc"], calib_samples=256, shrinkage=False)
    torch.testing.assert_close(outputs(naive.module, data), outputs(bn_only, data), atol=1e-4, rtol=1e-4)


def test_bn_placement_without_recalibration_scales_the_bn_weight_by_gamma() -> None:
    pruned, ctx, data = pruned_bn_net()
    res = asr.run(pruned, ctx, placement="bn", recalibrate_bn=False, calib_samples=256)
    g = f64(res.record["channels"]["conv1"]["gamma"]).float()
    torch.testing.assert_close(res.module.bn1.weight, pruned.bn1.weight * g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.module.bn1.bias, pruned.bn1.bias, rtol=0, atol=0)
    assert torch.equal(res.module.bn1.running_var, pruned.bn1.running_var)
    assert torch.equal(res.module.conv1.weight, pruned.conv1.weight)


def test_composes_with_prune_channels_and_exports_to_onnx(tmp_path) -> None:
    torch.manual_seed(0)
    model = BNNet().eval()
    data = batches((3, 6, 6), seed=3)
    x = data[0][0][:2]
    recipe = [
        {"pass": "prune_channels", "ratio": 0.25},
        {"pass": "magnitude_prune", "sparsity": 0.8},
        {"pass": "asr", "calib_samples": 128},
    ]
    res = fxslim.compress(model, x, recipe, data=data)
    out = res.module
    prune, mag, rep = res.report

    assert prune.params_after < prune.params_before
    assert rep.details["layers"]["conv1"]["applied_at"] == "bn1"
    assert len(rep.details["channels"]["conv1"]["v_dense"]) == out.conv1.weight.shape[0] == 12
    # the repair scales rows (and BN weights): the magnitude masks stay exactly as they were
    zeros = sum(int((out.get_submodule(n).weight == 0).sum()) for n in ("conv1", "conv2", "fc"))
    assert zeros == mag.details["zeros"]
    assert DENSE_META not in out.meta
    err = export_onnx(out, x, tmp_path / "asr.onnx")
    assert err < 1e-4

    # a structural pass between the pruning and the repair invalidates the saved dense state: named error
    wrong = [{"pass": "magnitude_prune", "sparsity": 0.8}, {"pass": "prune_channels", "ratio": 0.25}, "asr"]
    with pytest.raises(PassError, match="asr.*no longer fits"):
        fxslim.compress(model, x, wrong, data=data)


@pytest.mark.parametrize("placement", ["bn", "conv"])
@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_unfolded_corrections_are_ops_with_the_folded_outputs(placement, mode, tmp_path) -> None:
    """fold=False: each correction is a ChannelAffine op after its layer/BN, the outputs equal the folded
    model's, the weights stay the pruned ones, and the result still prunes and exports."""
    from fxslim.modules import ChannelAffine

    torch.manual_seed(0)
    model = BNNet().eval()
    data = batches((3, 6, 6), seed=3)
    x = data[0][0][:2]
    common = [{"pass": "magnitude_prune", "sparsity": 0.8}]
    opts = {"pass": "asr", "calib_samples": 128, "placement": placement, "mode": mode}
    folded = fxslim.compress(model, x, [*common, opts], data=data).module
    res = fxslim.compress(model, x, [*common, {**opts, "fold": False}], data=data)
    kept = res.module
    ops = [m for m in kept.modules() if isinstance(m, ChannelAffine)]
    assert len(ops) == len(res.report[-1].details["layers"]) == 3  # conv1, conv2, fc
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())
    batch = torch.cat([b[0] for b in data])
    torch.testing.assert_close(kept(batch), folded(batch), atol=1e-5, rtol=1e-4)
    pruned = fxslim.compress(model, x, common, data=data).module
    torch.testing.assert_close(kept.conv2.weight, pruned.conv2.weight)  # the correction is not in the weights
    assert export_onnx(kept, x, tmp_path / "kept.onnx") < 1e-4
    smaller = fxslim.compress(kept, x, [{"pass": "prune_channels", "ratio": 0.25}]).module
    assert smaller(x).shape == kept(x).shape


def test_needs_data_and_a_dense_model_and_valid_options() -> None:
    pruned, ctx, data = pruned_bn_net()
    with pytest.raises(PassError, match="needs data"):
        asr.run(pruned, PassContext(ctx.example_inputs))
    stripped = copy.deepcopy(pruned)
    stripped.meta.clear()
    other = fx.symbolic_trace(Plain())
    with pytest.raises(PassError, match="dense model"):
        asr.run(stripped, PassContext(ctx.example_inputs, data=data, reference=other))
    for bad, match in [
        ({"placement": "act"}, "placement"),
        ({"mode": "net"}, "mode"),
        ({"shrinkage": 0.1}, "shrinkage"),
        ({"lam": -1.0}, "lam"),
        ({"calib_samples": 1}, "calib_samples"),
    ]:
        with pytest.raises(RecipeError, match=match):
            asr.run(pruned, ctx, **bad)


def test_builtin_recipes_load() -> None:
    for name in ("asr90", "asr24"):
        specs = load_recipe(name)
        assert [s.name for s in specs][:2] == ["magnitude_prune", "asr"]
