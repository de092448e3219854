"""`fxslim.register_op`: one call makes a user's layer known to the tracer (leaf), the channel-rule table, the
MAC counter and the latency model. The worked example of the README: a gated conv kept as one node becomes
prunable, and removing its dead channels is exact (the dead-channel oracle); the e2cnn adapter registers its
GroupMaxPool through the same call; bad registrations are typed errors."""

import math
import operator

import pytest
import torch
from torch import nn

import fxslim
from fxslim.graph import cost
from fxslim.graph.rules import CHANNEL, FIXED, SLICE, rule_for, table
from fxslim.graph.shape import propagate
from fxslim.latency_ops import op_nodes
from fxslim.ops import LATENCY_OPS, LEAF_TYPES, RegistrationError, is_latency_op
from fxslim.pass_api import PassContext
from fxslim.passes import prune_channels


class GatedConv(nn.Module):
    """conv(x) * sigmoid(gate(x)): output channel c reads row c of both convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.gate = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.gate(x))


def gated_conv(deps, node, mod):
    """Input channels: columns of both convs; output channel c: row c (and bias c) of both."""
    x, shape = deps.ids(node.args[0]), deps.shape(node)
    if x is None or shape is None:
        return None
    w = deps.param(node, "conv.weight", [CHANNEL, SLICE], ["out", "in"])
    deps.param(node, "gate.weight", [CHANNEL, SLICE], ["out", "in"], like=w)
    for bias in ("conv.bias", "gate.bias"):
        deps.param(node, bias, [CHANNEL], ["out"], like=[w[0]])
    deps.unify(x[1], w[1])
    return [x[0], w[0]] + [deps.fresh_dim(s, FIXED) for s in shape[2:]]


def gated_conv_update(applier, node, mod):
    for conv in (mod.conv, mod.gate):
        conv.out_channels, conv.in_channels = conv.weight.shape[:2]


def gated_conv_macs(node, mod):
    out = node.meta["tensor_meta"].shape
    return 2 * math.prod(out) * math.prod(mod.conv.weight.shape[1:])  # two convs per output element


fxslim.register_op(GatedConv, rule=gated_conv, update=gated_conv_update, macs=gated_conv_macs, latency="op")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gated = GatedConv(8, 12)
        self.head = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.head(torch.relu(self.gated(torch.relu(self.stem(x)))))
        return self.fc(y.mean((2, 3)))


def test_the_registered_layer_is_one_node_with_its_rule_macs_and_latency_kind():
    gm = fxslim.trace(Net())
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "gated")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "gated", "head", "fc"]
    assert rule_for(node, gm)[0] is table.MODULE_RULES[GatedConv]
    assert GatedConv in LEAF_TYPES and GatedConv in LATENCY_OPS and is_latency_op(gm, node)
    x = torch.randn(2, 3, 8, 8)
    counted = fxslim.count(Net(), (x,))
    assert counted.uncounted == []
    assert counted.per_node["gated"].macs == 2 * (2 * 12 * 8 * 8) * (8 * 9)
    propagate(gm, (x,))
    assert "gated" in [n.name for n in op_nodes(gm)]  # the latency model times it as a memory-bound op


def test_its_channels_are_one_prunable_group_with_both_convs():
    dg = fxslim.analyze(Net(), (torch.randn(1, 3, 8, 8),))
    group = dg.group_of("gated")
    assert group is not None and group.prunable and group.size == 12
    members = {str(m) for m in group.members}
    want = {"gated.conv.weight[0]", "gated.gate.weight[0]", "gated.conv.bias[0]", "gated.gate.bias[0]"}
    want.add("head.weight[1]")
    assert want <= members
    stem = dg.group_of("stem")  # the input channels: columns of both convs
    assert {"gated.conv.weight[1]", "gated.gate.weight[1]"} <= {str(m) for m in stem.members}


def _kill(rows: list[nn.Module], columns: list[nn.Module], channels: list[int]) -> None:
    """Make `channels` dead: their rows (and bias) in every producer and their columns in every consumer are 0."""
    with torch.no_grad():
        for m in rows:
            m.weight[channels] = 0
            m.bias[channels] = 0
        for m in columns:
            m.weight[:, channels] = 0


def test_removing_its_dead_channels_is_exact():
    torch.manual_seed(0)
    model = Net().eval()
    g = model.gated
    _kill([model.stem], [g.conv, g.gate], [2, 7])  # its input channels (ratio 1/3 of 8)
    _kill([g.conv, g.gate], [model.head], [1, 4, 5, 10])  # its output channels (1/3 of 12)
    _kill([model.head], [model.fc], [0, 3])  # and the head's (1/3 of 6), so the cut is exact everywhere
    x = torch.randn(4, 3, 8, 8)
    res = prune_channels.run(fxslim.trace(model), PassContext(example_inputs=(x,)), ratio=1 / 3, importance="l1")
    pruned = res.module
    assert res.record["removed"] == 8
    assert pruned.gated.conv.weight.shape == (8, 6, 3, 3) and pruned.gated.gate.weight.shape == (8, 6, 3, 3)
    assert (pruned.gated.conv.out_channels, pruned.gated.conv.in_channels) == (8, 6)
    assert (pruned.gated.gate.out_channels, pruned.gated.gate.in_channels) == (8, 6)
    assert pruned.head.weight.shape == (4, 8, 1, 1)
    keep_out, keep_in = [c for c in range(12) if c not in (1, 4, 5, 10)], [c for c in range(8) if c not in (2, 7)]
    want = model.gated.gate.weight[keep_out][:, keep_in]
    torch.testing.assert_close(pruned.gated.gate.weight, want, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert fxslim.count(pruned, (x,)).per_node["gated"].macs == 2 * (4 * 8 * 8 * 8) * (6 * 9)


def test_the_e2cnn_adapter_registers_group_max_pool_like_a_user():
    from fxslim.e2cnn_adapter import GroupMaxPool

    assert GroupMaxPool in table.MODULE_RULES and GroupMaxPool in LEAF_TYPES
    gm = fxslim.trace(nn.Sequential(nn.Conv2d(1, 8, 3), GroupMaxPool(4)))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    dg = fxslim.analyze(gm, (torch.randn(1, 1, 7, 7),))
    assert [g.size for g in dg.groups] == [2]  # two fields of four channels, each one unit


def test_functions_methods_and_bad_registrations():
    def double(x):
        return x * 2

    fxslim.register_op(double, rule=table.FUNCTION_RULES[operator.mul], macs=operator.mul)
    assert table.FUNCTION_RULES[double] is table.FUNCTION_RULES[operator.mul]
    fxslim.register_op("frac", rule=table.METHOD_RULES["relu"], latency="op")
    assert table.METHOD_RULES["frac"] is table.METHOD_RULES["relu"] and "frac" in LATENCY_OPS
    with pytest.raises(RegistrationError, match="leaf=True applies to nn.Module subclasses"):
        fxslim.register_op(double, leaf=True)
    with pytest.raises(RegistrationError, match="latency='layer'; valid: None, op"):
        fxslim.register_op(GatedConv, latency="layer")
    with pytest.raises(RegistrationError, match="not an nn.Module subclass, a function or a method name"):
        fxslim.register_op(3)
    with pytest.raises(RegistrationError, match="macs=.*neither a function nor a counted op"):
        fxslim.register_op(double, macs=nn.Identity)
    with pytest.raises(RegistrationError, match="update= goes with a couple function"):
        fxslim.register_op(double, update=gated_conv_update)
    assert isinstance(RegistrationError("x"), fxslim.FxslimError)
    for name in ("double", "frac"):  # leave the tables as they were for the other tests
        table.FUNCTION_RULES.pop(double, None), table.METHOD_RULES.pop(name, None), LATENCY_OPS.discard(name)
    cost.MAC_RULES.pop(double, None)
