"""fxslim.latency_ops: which nodes the latency model counts as memory-bound ops (never view-like ones, never
the ones onnxruntime fuses into the conv before them), how one is timed alone (cached, per-run overhead
subtracted, in-place ops made safe), and that such an op steers objective="latency" towards its group."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim import latency_plan
from fxslim.graph.deps import analyze
from fxslim.graph.shape import propagate
from fxslim.latency import LatencyTable
from fxslim.latency_ops import _standalone, op_nodes, op_seconds, overhead_seconds
from fxslim.pass_api import PassContext
from fxslim.passes import prune_channels


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)  # after conv + BN, single user: fused
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.act2 = nn.SiLU()  # after a conv (through dropout, an identity in eval), not fused: counts
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.gelu = nn.GELU()
        self.scale = nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        a = self.act1(self.bn1(self.c1(x)))
        b = self.act2(self.drop(self.c2(a)))
        c = self.c3(b)
        d = a + c  # takes c3's output, read by nothing else: fused residual sum
        k = self.c4(b)
        e = F.relu(k) * k  # c4's output has two users: the relu is not fused and counts, as does the mul
        f = d * self.scale + e  # mul (counts), add of two non-conv values (counts)
        g = self.norm(f.permute(0, 2, 3, 1))  # permute: view-like, never counts; LayerNorm counts
        h = self.gelu(self.fc(g))  # GELU after a linear counts
        return h.reshape(h.shape[0], -1).sum(1)  # reshape never counts; sum is not in the list: left out


X = torch.randn(1, 3, 6, 6)


def traced():
    torch.manual_seed(0)
    gm = fxslim.trace(Net().eval())
    propagate(gm, (X,))
    return gm


def test_op_nodes_count_memory_bound_ops_and_skip_fused_and_view_like():
    gm = traced()
    names = [n.name for n in op_nodes(gm)]
    assert names == ["act2", "relu", "mul", "mul_1", "add_1", "norm", "gelu"]


def test_standalone_op_computes_the_node(tmp_path):
    gm = traced()
    values = {}
    for node in gm.graph.nodes:  # every node's value on X, to feed one node alone
        if node.op == "placeholder":
            values[node] = X
        elif node.op != "output":
            args = torch.fx.node.map_arg(node.args, lambda a: values[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: values[a])
            if node.op == "get_attr":
                values[node] = getattr(gm, node.target)
            elif node.op == "call_module":
                values[node] = gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                values[node] = node.target(*args, **kwargs)
            else:
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    by_name = {n.name: n for n in gm.graph.nodes}
    norm, _, key = _standalone(gm, by_name["norm"])
    got = norm(values[by_name["norm"].args[0]])
    torch.testing.assert_close(got, values[by_name["norm"]])
    assert "LayerNorm((8,)" in key and "x(1, 6, 6, 8)" in key
    mul, shape, key = _standalone(gm, by_name["mul_1"])  # d * scale: the parameter comes along as a constant
    assert shape == (1, 8, 6, 6) and "attr(8, 1, 1)" in key
    torch.testing.assert_close(mul(values[by_name["add"]]), values[by_name["mul_1"]])
    act, _, _ = _standalone(gm, by_name["act1"])  # an in-place activation is timed out of place
    x = torch.randn(1, 8, 6, 6)
    before = x.clone()
    act(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_op_seconds_measures_once_and_subtracts_the_overhead(tmp_path):
    gm = traced()
    table = LatencyTable(tmp_path / "t.json")
    node = next(n for n in gm.graph.nodes if n.name == "gelu")
    t1, hit1 = op_seconds(gm, node, table)
    t2, hit2 = op_seconds(gm, node, table)
    assert (hit1, hit2) == (False, True) and t1 == t2 >= 0
    _, _, key = _standalone(gm, node)
    assert t1 == pytest.approx(max(0.0, table.get(key) - overhead_seconds(table)))
    assert len(table) == 2  # the op and the overhead


def test_an_op_steers_the_greedy_to_its_group():
    """Two groups whose layers cost the same; a memory-bound op on group 0's channels (no MACs, 9 s per
    full width) makes group 0's MACs the cheaper to keep: group 0 shrinks first, group 1 stays whole."""
    torch.manual_seed(0)
    gm = fxslim.trace(
        nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.Flatten(), nn.Linear(3456, 4)).eval()
    )
    x = torch.randn(1, 3, 16, 16)
    dg = analyze(gm, (x,))
    groups = dg.prunable_groups[:2]
    scores = np.ones(int(dg.label.max()) + 1)
    layers = [
        latency_plan.Layer("a", "Conv2d", 0.0, 1.0, macs=1000),
        latency_plan.Layer("b", "Conv2d", 0.0, 1.0, macs=1000),
        latency_plan.Layer("op", "GELU", 0.0, 9.0, macs=0),
    ]
    n0 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    model = latency_plan.LatencyModel(layers, n0, np.zeros((3, 2)), np.zeros(3), np.ones(3), 0, 0, 2.0, 1)
    kept, record = latency_plan.choose_widths(groups, scores, model, 0.25, np.ones(2, dtype=np.int64), 0.75)
    lat = record["latency"]
    assert (lat["layers"], lat["ops"]) == (2, 1)
    assert lat["estimated_s"] <= lat["target_s"]
    assert lat["target_s"] == pytest.approx(
        sum((1 - math.floor(0.25 * g.size) / g.size) * w for g, w in zip(groups, (10.0, 1.0), strict=True))
    )
    assert kept[1] == groups[1].size and kept[0] < groups[0].size


class Fusions(nn.Module):
    """What onnxruntime fuses: conv -> BN -> add -> ReLU (a bottleneck's tail), conv -> .relu() (method), a
    conv output times a parameter and then times a constant computed from one, a 2-D linear -> ReLU; and an op
    fed by a parameter alone is no op of the graph. Only the mean is left (onnxruntime's optimised graph:
    Conv x4, ReduceMean, FusedGemm and layout reorders)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(8, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.gate = nn.Parameter(torch.zeros(8, 1, 1))
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        y = torch.relu(self.bn(self.c1(h)) + h)  # BN, add and ReLU all fused into c1
        y = self.c2(y).relu()  # method form: fused
        y = self.c3(y) * self.scale  # folded into c3
        y = y * torch.sigmoid(self.gate)  # a constant (sigmoid of a parameter): folded as well
        return F.relu(self.fc(y.mean((2, 3))))  # mean counts; ReLU after a 2-D linear is fused


def test_fusion_rules_follow_onnxruntime():
    torch.manual_seed(0)
    gm = fxslim.trace(Fusions().eval())
    propagate(gm, (torch.randn(1, 8, 5, 5),))
    assert [n.name for n in op_nodes(gm)] == ["mean"]


def test_cache_key_names_options_and_not_nodes():
    class Pools(nn.Module):
        def forward(self, x):
            a = F.avg_pool2d(x, 3, stride=1)
            b = F.avg_pool2d(x, 3, padding=1)
            c = F.avg_pool2d(x, 3, stride=1)  # the same op as a, another node
            return torch.cat([a, a], 1), torch.cat([c, c], 1), b

    gm = fxslim.trace(Pools())
    propagate(gm, (torch.randn(1, 4, 8, 8),))
    keys = {n.name: _standalone(gm, n)[2] for n in gm.graph.nodes if n.op == "call_function"}
    assert keys["avg_pool2d"] != keys["avg_pool2d_1"]
    assert "'stride': 1" in keys["avg_pool2d"] and "'padding': 1" in keys["avg_pool2d_1"]
    assert keys["cat"] == keys["cat_1"] and keys["avg_pool2d"] == keys["avg_pool2d_2"]  # node names never enter


class Transposed(nn.Module):
    """Group A (16) runs through the measured conv; group B (16) only through GELU and transposed convs,
    which the latency model does not time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(16, 4, 2, stride=2)

    def forward(self, x):
        return self.up2(F.gelu(self.up1(F.gelu(self.conv(x)))))


def test_a_group_with_ops_alone_loses_the_uniform_ratio(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    gm = fxslim.trace(Transposed().eval())
    res = prune_channels.run(
        gm,
        PassContext(example_inputs=(x,)),
        ratio=0.25,
        objective="latency",
        latency_table=str(tmp_path / "t.json"),
        round_to=1,
    )
    lat = res.record["latency"]
    assert (lat["layers"], lat["ops"]) == (1, 2)
    kept = {g["members"][0].split("[")[0].split(".")[0]: g["kept"] for g in res.record["per_group"]}
    assert res.module.up1.out_channels == 16 - math.floor(0.25 * 16)  # group B: uniform, never priced at 0
    assert res.module(x).shape == (1, 4, 32, 32), kept


@pytest.mark.parametrize(
    "layers,counted",
    [
        ([nn.Conv2d(4, 8, 1), nn.Hardswish(), nn.Conv2d(8, 4, 1)], []),  # fused into the conv
        ([nn.Flatten(), nn.Linear(36, 8), nn.Hardswish(), nn.Linear(8, 4)], ["2"]),  # Gemm: HardSigmoid + Mul
        ([nn.Flatten(), nn.Linear(36, 8), nn.ReLU6(), nn.Linear(8, 4)], ["2"]),  # Gemm: a separate Clip
        ([nn.Flatten(), nn.Linear(36, 8), nn.Sigmoid(), nn.Linear(8, 4)], []),  # FusedGemm
    ],
)
def test_activations_fused_by_conv_and_by_gemm_differ(layers, counted):
    gm = fxslim.trace(nn.Sequential(*layers).eval())
    propagate(gm, (torch.randn(1, 4, 3, 3),))
    assert [n.target for n in op_nodes(gm)] == counted


def test_a_graph_deeper_than_the_recursion_limit():
    """Whether an op is computed from constants alone is found in one pass over the graph, not by recursing
    through its inputs (EfficientNetV2 is deeper than Python's recursion limit)."""
    depth = sys.getrecursionlimit() + 200
    gm = fxslim.trace(nn.Sequential(nn.Conv2d(3, 4, 1), *[nn.GELU() for _ in range(depth)]).eval())
    propagate(gm, (torch.randn(1, 3, 2, 2),))
    assert len(op_nodes(gm)) == depth
