"""Shape propagation: `reuse=True` skips the run only when nothing that shapes depend on has changed."""

from __future__ import annotations

import torch
from torch import nn

import fxslim
from fxslim.graph.shape import propagate
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
