"""fold_bn: before/after pairs. Each foldable model must compute the same outputs (eval mode) with its BN
nodes gone; each unfoldable one must come back with the BN in place and the reason recorded."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxslim.pass_api import PassContext
from fxslim.passes import fold_bn


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so that a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g))
                m.bias.data.copy_(torch.randn(c, generator=g))
    return model.eval()


def fold(model: nn.Module, x: torch.Tensor):
    gm = fx.symbolic_trace(randomise_bn(model))
    res = fold_bn.run(gm, PassContext(example_inputs=(x,)))
    return gm, res


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bn_nodes(gm: fx.GraphModule) -> list[str]:
    mods = dict(gm.named_modules())
    return [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(mods[n.target], nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
    ]


class ConvBN2d(nn.Module):
    def __init__(self, groups: int = 1, bias: bool = True, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


class ConvBN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBN3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, bias=False)
        self.bn = nn.BatchNorm3d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 7)
        self.bn = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


FOLDABLE = [
    pytest.param(ConvBN2d(), torch.randn(2, 4, 9, 9), 2, id="conv2d"),
    pytest.param(ConvBN2d(groups=2), torch.randn(2, 4, 9, 9), 2, id="grouped-conv2d"),
    pytest.param(ConvBN2d(groups=4, bias=False), torch.randn(2, 4, 9, 9), 2, id="depthwise-ish-no-bias"),
    pytest.param(ConvBN2d(bias=False, affine=False), torch.randn(2, 4, 9, 9), 2, id="no-bias-no-affine"),
    pytest.param(ConvBN1d(), torch.randn(3, 3, 11), 1, id="conv1d"),
    pytest.param(ConvBN3d(), torch.randn(2, 2, 5, 5, 5), 1, id="conv3d-no-bias"),
    pytest.param(LinearBN(), torch.randn(6, 10), 1, id="linear-bn1d"),
]


@pytest.mark.parametrize("model, x, n_bn", FOLDABLE)
def test_fold_keeps_outputs_and_removes_bn(model: nn.Module, x: torch.Tensor, n_bn: int) -> None:
    torch.manual_seed(0)
    before, res = fold(model, x)
    after = res.module

    assert res.changed
    assert len(res.record["folded"]) == n_bn and res.record["skipped"] == []
    assert bn_nodes(before) and not bn_nodes(after)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in after.modules())
    with torch.no_grad():
        want, got = before(x), after(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


def test_fold_drops_parameter_count_and_adds_missing_bias() -> None:
    model = ConvBN2d(bias=False)
    before, res = fold(model, torch.randn(1, 4, 5, 5))
    # conv(4->8, no bias) gains 8 bias entries, BN(8) loses 16 affine ones; BN(6) after conv2 loses 12.
    assert n_params(res.module) == n_params(before) - 16 + 8 - 12
    assert res.module.conv.bias is not None and res.module.conv.bias.shape == (8,)
    assert res.record["folded"] == [["conv", "bn"], ["conv2", "bn2"]]


def test_fold_matches_the_equation_per_channel() -> None:
    """Per channel: W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    model = randomise_bn(LinearBN())
    res = fold_bn.run(fx.symbolic_trace(model), PassContext(example_inputs=(torch.randn(2, 10),)))
    bn, fc = model.bn, model.fc
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(res.module.fc.weight, fc.weight * s[:, None])
    torch.testing.assert_close(res.module.fc.bias, (fc.bias - bn.running_mean) * s + bn.bias)


class ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class TransposedConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class LinearOnSequence(nn.Module):
    """Linear on (N, L, F) then BN1d normalises dim 1 = L: not the Linear's channels, so never foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


class BNAfterReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


NOT_FOLDABLE = [
    pytest.param(ConvUsedTwice(), torch.randn(2, 3, 6, 6), "2 users", id="conv-output-used-twice"),
    pytest.param(SharedConv(), torch.randn(2, 4, 6, 6), "called at 2 sites", id="conv-module-shared"),
    pytest.param(TransposedConvBN(), torch.randn(2, 3, 6, 6), "ConvTranspose2d", id="transposed-conv"),
    pytest.param(NoRunningStats(), torch.randn(2, 3, 6, 6), "track_running_stats", id="no-running-stats"),
    pytest.param(LinearOnSequence(), torch.randn(2, 5, 5), "rank 3", id="linear-on-3d-input"),
    pytest.param(BNAfterReLU(), torch.randn(2, 3, 6, 6), "not a module call", id="bn-after-function"),
]


@pytest.mark.parametrize("model, x, reason", NOT_FOLDABLE)
def test_unfoldable_bn_is_kept_and_reported(model: nn.Module, x: torch.Tensor, reason: str) -> None:
    before, res = fold(model, x)
    assert not res.changed
    assert res.record["folded"] == []
    assert len(res.record["skipped"]) == 1 and res.record["skipped"][0][0] == "bn"
    assert reason in res.record["skipped"][0][1]
    assert bn_nodes(res.module) == bn_nodes(before)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), before(x))


def test_input_module_is_not_mutated() -> None:
    gm = fx.symbolic_trace(randomise_bn(ConvBN2d(bias=False)))
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    res = fold_bn.run(gm, PassContext(example_inputs=(torch.randn(1, 4, 5, 5),)))
    assert res.module is not gm and res.changed
    assert gm.code == code
    assert gm.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(gm.state_dict()[k], v), k
    assert gm.conv.bias is None and len(bn_nodes(gm)) == 2


def test_training_flag_survives_and_probe_does_not_touch_statistics() -> None:
    """The Linear rank probe runs the model; in train mode it would overwrite the statistics being folded."""
    model = randomise_bn(LinearBN())
    gm = fx.symbolic_trace(model).train()
    x = torch.randn(6, 10)
    res = fold_bn.run(gm, PassContext(example_inputs=(x * 100 + 50,)))
    assert res.module.training
    want = model.eval()(x)
    torch.testing.assert_close(res.module.eval()(x), want, atol=1e-5, rtol=1e-5)


def test_shared_bn_module_is_kept_until_its_last_use() -> None:
    class SharedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + torch.relu(self.bn(torch.relu(self.b(x))))

    x = torch.randn(2, 3, 4, 4)
    before, res = fold(SharedBN(), x)
    assert res.record["folded"] == [["a", "bn"]]
    assert hasattr(res.module, "bn")  # still called after the ReLU
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), before(x), atol=1e-5, rtol=1e-5)
