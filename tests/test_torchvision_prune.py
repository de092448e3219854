"""torchvision classifiers (random init) pruned at ratio 0.5, without and with round_to=8 (objective="latency"'s
default): forward runs with the original output shape, params and MACs drop, and the ONNX export matches
onnxruntime. Also ONNX parity on generated nets."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision

import fxslim
from fxslim.zoo.randnet import RandomNet, random_spec, randomize_bn

MODELS = {
    "resnet18": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "densenet121": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "vit_b_16": ({"image_size": 32}, 32),
}
SLOW = {"densenet121", "efficientnet_b0", "vit_b_16"}  # 1-5 s each on two cores: `make test` only, not test-fast


def _calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Random-init BN statistics make outputs ~1e-10 (parity would prove nothing): estimate them once."""
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                m.reset_running_stats()
        model(x)
    model.eval()


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in SLOW else []) for n in MODELS])
def test_torchvision_prune_half_forward_and_onnx_parity(name, round_to, tmp_path):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    x = torch.randn(1, 3, size, size)
    _calibrate_bn(model, torch.randn(4, 3, size, size))
    if name.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised head: outputs would be 0
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5, "round_to": round_to}])
    out = res.module(x)
    assert out.shape == model(x).shape == (1, 1000)
    r = res.report[0]
    assert r.params_after < 0.8 * r.params_before and r.macs_after < 0.8 * r.macs_before
    err = fxslim.export_onnx(res.module, (x,), tmp_path / f"{name}.onnx")
    assert err < 1e-3 * max(1.0, out.abs().max().item())


@pytest.mark.parametrize("seed", range(4))
def test_generated_nets_pruned_export_with_parity(seed, tmp_path):
    spec = random_spec(random.Random(seed), n_blocks=4)
    torch.manual_seed(seed)
    model = randomize_bn(RandomNet(spec), seed).eval()
    x = spec.example_input()
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.4}, "fold_bn"])
    err = fxslim.export_onnx(res.module, (x,), tmp_path / "net.onnx")
    assert err < 1e-4
