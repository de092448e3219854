"""fcos_fuse: before/after graphs; exact duplicates fuse with zero error; counts follow epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
from fxslim.pass_api import PassContext
from fxslim.passes import fcos_fuse
from fxslim.zoo.models import CNN1D
from fxslim.zoo.randnet import randomize_bn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.f = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.f(y)  # residual: a's and f's rows describe the channels together
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 2), 1))


def _with_duplicates(model: Net) -> Net:
    """Channels 4..7 become exact copies of channels 0..3 in every producer (a, bn, f rows); consumer
    columns (f, head) stay different: fusion sums them."""
    with torch.no_grad():
        for t in (model.a.weight, model.a.bias, model.bn.weight, model.bn.bias, model.bn.running_mean,
                  model.bn.running_var, model.f.weight, model.f.bias):
            t[4:] = t[:4]
    return model


def test_exact_duplicates_fuse_losslessly():
    torch.manual_seed(0)
    model = _with_duplicates(randomize_bn(Net()).eval())
    x = torch.randn(2, 3, 6, 6)
    res = fcos_fuse.run(fxslim.trace(model), PassContext(example_inputs=(x,)), epsilon=0.5)
    new = res.module
    assert res.changed and res.record["fused"] == 4
    assert (new.a.out_channels, new.bn.num_features, new.f.out_channels, new.head.in_features) == (4, 4, 4, 16)
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)


def test_l1_weighting_and_threshold_also_exact_on_duplicates():
    torch.manual_seed(1)
    model = _with_duplicates(randomize_bn(Net()).eval())
    x = torch.randn(2, 3, 6, 6)
    gm = fxslim.trace(model)
    ctx = PassContext(example_inputs=(x,))
    a = fcos_fuse.run(gm, ctx, epsilon=0.5, how="l1", linkage="complete").module
    b = fcos_fuse.run(gm, ctx, epsilon=None, threshold=1e-9).module  # only distance-0 pairs fuse
    for new in (a, b):
        assert new.a.out_channels == 4
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("epsilon", [0.5, 0.75, 0.9])
def test_cluster_count_follows_epsilon_on_cnn1d(epsilon):
    torch.manual_seed(0)
    model = randomize_bn(CNN1D(width=16)).eval()
    x = torch.randn(2, 2, 128)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    res = fcos_fuse.run(gm, PassContext(example_inputs=(x,)), epsilon=epsilon)
    after = fxslim.analyze(res.module, (x,))
    want = sorted(math.ceil((1 - epsilon) * g.size) for g in dg.prunable_groups)
    assert sorted(g.size for g in after.prunable_groups) == want
    assert res.module(x).shape == (2, 11)


def test_bad_options_are_recipe_errors():
    model, x = Net().eval(), torch.randn(1, 3, 6, 6)
    for opts, msg in (({"epsilon": 1.0}, "epsilon"), ({"linkage": "median"}, "valid: average"),
                      ({"epsilon": None}, "exactly one"), ({"threshold": 0.1}, "exactly one"),
                      ({"how": "max"}, "valid: mean, l1")):
        with pytest.raises(fxslim.RecipeError, match=msg):
            fxslim.compress(model, (x,), [{"pass": "fcos_fuse", **opts}])


def test_composes_in_a_recipe_with_export(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(CNN1D(width=16)).eval()
    x = torch.randn(1, 2, 128)
    res = fxslim.compress(model, (x,), [{"pass": "fcos_fuse", "epsilon": 0.75}, "fold_bn"])
    assert res.report[0].macs_after < 0.2 * res.report[0].macs_before
    assert fxslim.export_onnx(res.module, (x,), tmp_path / "m.onnx") < 1e-4
    assert np.isfinite(res.module(x).detach().numpy()).all()


def test_builtin_fcos_recipes_run_the_paper_pipeline():
    from fxslim.recipe import load_recipe

    full = load_recipe("fcos")
    assert [s.name for s in full] == ["fcos_fuse", "finetune", "lacd_drop", "finetune"]
    assert (full[1].options["epochs"], full[3].options["epochs"]) == (20, 80)
    assert full[1].options["scheduler"] == "step" and full[1].options["gamma"] == 0.8
    quick = load_recipe("fcos_quick")
    assert (quick[1].options["epochs"], quick[3].options["epochs"]) == (2, 8)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 128, generator=g)
    y = torch.randint(0, 11, (64,), generator=g)
    data = [(x[i : i + 32], y[i : i + 32]) for i in (0, 32)]
    model = randomize_bn(CNN1D(width=16)).eval()
    recipe = [{"pass": s.name, **s.options} for s in quick]
    recipe[1]["epochs"], recipe[3]["epochs"], recipe[2]["calib_samples"] = 1, 1, 64
    res = fxslim.compress(model, (x[:1],), recipe, data=data)
    assert [r.name for r in res.report] == ["fcos_fuse", "finetune", "lacd_drop", "finetune"]
    assert res.report[-1].macs_after < 0.2 * res.report[0].macs_before
