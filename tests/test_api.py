"""Public API contract: compress never mutates its input, recipes in all three forms, and every bad input
gives a typed error that names the problem."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxslim
from fxslim.zoo.randnet import RandomNet, Spec, randomize_bn


def _model():
    spec = Spec(2, 3, 8, 8, (("res", 8), ("dense", 4), ("se", 4)), "flatten")
    torch.manual_seed(0)
    return randomize_bn(RandomNet(spec)).eval(), spec.example_input()


def _snapshot(model):
    return copy.deepcopy(model.state_dict()), model.training, [id(p) for p in model.parameters()]


def _unchanged(model, snap):
    state, training, ids = snap
    assert model.training == training and [id(p) for p in model.parameters()] == ids
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_compress_returns_new_module_and_leaves_input_untouched(tmp_path):
    model, x = _model()
    model.train()
    snap = _snapshot(model)
    res = fxslim.compress(model, (x,), ["fold_bn", {"pass": "prune_channels", "ratio": 0.5}], dump_dir=tmp_path)
    _unchanged(model, snap)
    assert isinstance(res.module, torch.fx.GraphModule) and res.module is not model
    assert res.module(x).shape == model.eval()(x).shape
    assert [r.name for r in res.report] == ["fold_bn", "prune_channels"]
    r = res.report[1]
    assert r.params_after == sum(p.numel() for p in res.module.parameters()) < r.params_before
    assert r.macs_after < r.macs_before and r.changed
    assert r.macs_after == fxslim.count(res.module, (x,)).macs
    assert "prune_channels" in res.summary() and "total" in res.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_input.txt", "001_fold_bn.txt",
                                                          "002_prune_channels.txt"]


def test_recipe_as_toml_file_and_builtin(tmp_path):
    model, x = _model()
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\npass = "prune_channels"\nratio = 0.25\nimportance = "l2"\n')
    a = fxslim.compress(model, (x,), path)
    b = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.25, "importance": "l2"}])
    assert a.report[0].params_after == b.report[0].params_after
    c = fxslim.compress(model, (x,), "prune50")
    assert [r.name for r in c.report] == ["prune_channels", "fold_bn"]


def test_dump_env_switch(tmp_path, monkeypatch):
    model, x = _model()
    monkeypatch.setenv("FXSLIM_DUMP", str(tmp_path / "ir"))
    fxslim.compress(model, (x,), ["prune_channels"])
    assert (tmp_path / "ir" / "001_prune_channels.txt").read_text().startswith("# 001 prune_channels")


def test_unknown_pass_and_option_list_valid_names():
    model, x = _model()
    with pytest.raises(fxslim.RecipeError, match="valid passes: .*prune_channels"):
        fxslim.compress(model, (x,), ["prune_chanels"])
    with pytest.raises(fxslim.RecipeError, match="valid options: ratio, importance"):
        fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratoi": 0.5}])
    with pytest.raises(fxslim.RecipeError, match="no recipe file or built-in"):
        fxslim.compress(model, (x,), "no_such_recipe")


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(ratio):
    model, x = _model()
    snap = _snapshot(model)
    with pytest.raises(fxslim.RecipeError, match=r"pass 'prune_channels': ratio=.* must be a number in \[0, 1\)"):
        fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": ratio}])
    _unchanged(model, snap)


def test_unknown_importance():
    model, x = _model()
    with pytest.raises(fxslim.RecipeError, match="valid: l1, l2, bn_scale, random"):
        fxslim.compress(model, (x,), [{"pass": "prune_channels", "importance": "taylor"}])


def test_wrong_example_input_shape_names_the_node():
    model, _ = _model()
    snap = _snapshot(model)
    with pytest.raises(fxslim.AnalysisError, match="stem_conv.*expected input.*5 channels"):
        fxslim.compress(model, (torch.randn(2, 5, 8, 8),), ["prune_channels"])
    _unchanged(model, snap)


def test_untraceable_model_names_module_and_construct():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.conv(x))

    model = Net()
    snap = _snapshot(model)
    with pytest.raises(fxslim.TraceError, match="control flow.*'gate'"):
        fxslim.compress(model, (torch.randn(1, 3, 4, 4),), ["prune_channels"])
    _unchanged(model, snap)
    # the suggested fix works: make the module a leaf (its channels are then frozen, never guessed)
    gm = fxslim.trace(model, leaf_modules=["gate"])
    dg = fxslim.analyze(gm, (torch.randn(1, 3, 4, 4),))
    assert [u.target for u in dg.unsupported] == ["Gate"] and not dg.prunable_groups


def test_model_with_no_prunable_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))  # its only channels are the model output
    with pytest.raises(fxslim.PassError, match="no prunable group"):
        fxslim.compress(model, (torch.randn(1, 3, 8, 8),), ["prune_channels"])


def test_failing_pass_is_named():
    model, x = _model()
    with pytest.raises(fxslim.PassError, match="'bn_recalibrate'.*data="):
        fxslim.compress(model, (x,), ["bn_recalibrate"])


def test_count_matches_parameters_and_hand_macs():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    cost = fxslim.count(conv, (torch.randn(1, 3, 4, 4),))
    assert cost.params == sum(p.numel() for p in conv.parameters())
    assert cost.macs == 8 * 16 * 3 * 9 + 128 * 10
