"""Tracing: leaf policy, eval-mode paths, typed errors naming module and construct, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.inner(x)
        if self.training:  # python-level branch: traced on its inference path
            x = x * 2
        return self.drop(x)


def test_traces_in_eval_mode_without_touching_the_model():
    model = Outer().train()
    gm = fxslim.trace(model)
    assert model.training and model.inner.training
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.relu]
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_leaf_modules_by_type_and_name():
    gm = fxslim.trace(Outer(), leaf_modules=[Inner])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner", "drop"]
    gm = fxslim.trace(Outer(), leaf_modules=["inner"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner", "drop"]
    with pytest.raises(fxslim.TraceError, match="'nope'"):
        fxslim.trace(Outer(), leaf_modules=["nope"])


class Looping(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Inner())

    def forward(self, x):
        return self.body(x)


def test_errors_name_the_module_path_and_construct():
    class Loop(nn.Module):
        def forward(self, x):
            return sum(t for t in x)  # iterating over a traced tensor

    model = Looping()
    model.body[0].conv = nn.Sequential(nn.Conv2d(3, 4, 1), Loop())
    with pytest.raises(fxslim.TraceError, match=r"iteration over a traced value.*'body\.0\.conv\.1'"):
        fxslim.trace(model)

    class Branch(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else x - 1

    model.body[0].conv = Branch()
    with pytest.raises(fxslim.TraceError, match=r"control flow.*'body\.0\.conv'"):
        fxslim.trace(model)
    with pytest.raises(fxslim.TraceError, match="nn.Module"):
        fxslim.trace(lambda x: x)


def test_traced_and_pruned_modules_save_and_load(tmp_path):
    model = nn.Sequential(Outer(), nn.Conv2d(4, 2, 1)).eval()
    res = fxslim.compress(model, (torch.randn(1, 3, 4, 4),), "prune50")
    assert res.report[0].params_after < res.report[0].params_before
    torch.save(res.module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)  # a whole GraphModule is not weights-only
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(loaded(x), res.module(x))


class _ParamReads(nn.Module):
    """Parameters read as attributes in forward: one shared by two submodules, one read twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied: the first name, a.weight, is the one fx records
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        w1, w2 = self.a.weight, self.b.weight
        return (x @ w1.t() + x @ w2.t()) * self.scale + self.scale


def test_parameter_attribute_reads_trace_as_fx_does():
    from torch import fx

    model = _ParamReads().eval()
    x = torch.randn(3, 4)
    gm = fxslim.trace(model, (x,))
    get_attrs = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert get_attrs == [str(n.target) for n in fx.symbolic_trace(model).graph.nodes if n.op == "get_attr"]
    assert get_attrs == ["a.weight", "scale"]  # one node per parameter, under its first name
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
