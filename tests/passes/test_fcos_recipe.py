"""The composed FCOS recipe (fcos_fuse → finetune → lacd_drop → finetune, the built-in `fcos_quick` with its
epochs cut to one) runs on every zoo model, 1-D and 2-D, and on torchvision's resnet18 and densenet121: the
result runs, keeps the output shape, has fewer MACs, and matches its ONNX export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxslim
from fxslim.recipe import load_recipe
from fxslim.zoo import models as zoo
from fxslim.zoo.randnet import randomize_bn
from tests.zoo.test_models import CASES, IDS


def _recipe() -> list[dict]:
    recipe = [{"pass": s.name, **s.options} for s in load_recipe("fcos_quick")]
    for step in recipe:
        if step["pass"] == "finetune":
            step["epochs"] = 1
        if step["pass"] == "lacd_drop":
            step["calib_samples"] = 24
    return recipe


def _run_recipe(model: nn.Module, shape: tuple, classes: int, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, *shape[1:], generator=g)
    y = torch.randint(0, classes, (32,), generator=g)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    example = (x[: shape[0]],)
    before = fxslim.count(model, example)
    res = fxslim.compress(model.eval(), example, _recipe(), data=data)
    out = res.module(*example)
    assert out.shape == model(*example).shape
    assert torch.isfinite(out).all()
    assert [r.name for r in res.report] == ["fcos_fuse", "finetune", "lacd_drop", "finetune"]
    assert res.report[-1].macs_after < before.macs
    assert fxslim.export_onnx(res.module, example, tmp_path / "m.onnx") < 1e-3


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=IDS)
def test_fcos_recipe_on_every_zoo_model(name, kwargs, shape, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.build(name, **kwargs))
    _run_recipe(model, shape, kwargs.get("num_classes", 10), tmp_path)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("densenet121", marks=pytest.mark.slow)])
def test_fcos_recipe_on_torchvision(arch, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None, num_classes=10))
    _run_recipe(model, (2, 3, 32, 32), 10, tmp_path)
