"""Shape propagation: `reuse=True` skips the run only when nothing that shapes depend on has changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

import fxslim
from fxslim.errors import AnalysisError
from fxslim.graph.shape import propagate, tensor_metadata
from fxslim.rewrite import replace_module


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.probe = Counting()

    def forward(self, x):
        return self.probe(self.a(x))


def _calls(gm) -> int:
    return gm.get_submodule("probe").calls


def test_reuse_skips_only_an_unchanged_module_and_input():
    gm = fxslim.trace(Net().eval(), leaf_modules=(Counting,))
    x = torch.randn(1, 3, 8, 8)
    propagate(gm, (x,))
    propagate(gm, (x,), reuse=True)
    assert _calls(gm) == 1  # same module, same input shape: shapes on the nodes are still true
    propagate(gm, (torch.randn(2, 3, 8, 8),), reuse=True)
    assert _calls(gm) == 2  # new input shape
    assert list(next(n for n in gm.graph.nodes if n.name == "a").meta["tensor_meta"].shape) == [2, 4, 8, 8]
    gm.a.stride = (2, 2)  # module configuration
    propagate(gm, (torch.randn(2, 3, 8, 8),), reuse=True)
    assert _calls(gm) == 3
    assert list(next(n for n in gm.graph.nodes if n.name == "a").meta["tensor_meta"].shape) == [2, 4, 4, 4]
    propagate(gm, (torch.randn(2, 3, 8, 8),))
    assert _calls(gm) == 4  # reuse=False always runs


def test_rewritten_clone_is_propagated_again():
    gm = fxslim.trace(Net().eval(), leaf_modules=(Counting,))
    x = torch.randn(1, 3, 8, 8)
    propagate(gm, (x,))
    new = replace_module(gm, "a", nn.Conv2d(3, 6, 1))  # new parameter shapes, same graph code
    propagate(new, (x,), reuse=True)
    assert list(next(n for n in new.graph.nodes if n.name == "a").meta["tensor_meta"].shape) == [1, 6, 8, 8]
    assert list(next(n for n in gm.graph.nodes if n.name == "a").meta["tensor_meta"].shape) == [1, 4, 8, 8]


def _tensor_cases() -> list[torch.Tensor]:
    x = torch.randn(2, 3, 4, 5)
    return [
        x,
        x.contiguous(memory_format=torch.channels_last),
        torch.randn(1, 6, 1, 1),  # both contiguous and channels-last: contiguous wins
        torch.randn(1, 6, 1, 1).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
        x.permute(0, 2, 3, 1),  # neither
        x[:, :2],
        torch.randn(3, 1).expand(3, 4),  # stride 0
        torch.randn(4, 3).t(),
        torch.zeros(0, 3),
        torch.tensor(2.0),
        nn.Parameter(torch.randn(4, 3)),
        torch.randn(4, 3, dtype=torch.float64).requires_grad_(),
        torch.arange(6),
    ]


def test_tensor_metadata_equals_torch_fx_extraction():
    for t in _tensor_cases():
        assert tensor_metadata(t) == _extract_tensor_metadata(t), (t.shape, t.stride())


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("scale", torch.ones(1, 8, 1, 1))

    def forward(self, x, bias: float = 1.0):
        y = self.conv(x) * self.scale + bias
        a, b = y.chunk(2, dim=1)
        z = torch.cat([a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), b], 1)
        return z.max(dim=1), z.size(1), (z.mean(), [z.flatten(1)])


def test_propagate_records_what_torch_fx_shape_prop_records():
    gm = fxslim.trace(Branchy().eval())
    x = torch.randn(2, 3, 6, 6)
    propagate(gm, (x,))  # the default of `bias` is used
    ours = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop("type", None)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    theirs = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    assert ours == theirs
    assert ours["output"][0] is not None


def test_propagate_names_the_failing_node():
    gm = fxslim.trace(Branchy().eval())
    with pytest.raises(AnalysisError, match="node 'conv'"):
        propagate(gm, (torch.randn(2, 4, 6, 6),))
