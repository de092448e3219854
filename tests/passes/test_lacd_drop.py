"""lacd_drop: a block made useless on purpose is dropped, a useful one is kept, the report lists probes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.pass_api import PassContext
from fxslim.passes import lacd_drop


class Net(nn.Module):
    """block 1 (plain): relu([x0, -x0, x1, -x1]) makes the amplitude of x0 linearly decodable after pooling;
    block 2 (residual): its branch ends in an all-zero conv, so it adds nothing."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 1, bias=False)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]).unsqueeze(-1))
            self.conv3.weight.zero_()
            self.conv3.bias.zero_()

    def forward(self, x):
        h = self.act(self.conv1(x))
        h = h + self.conv3(torch.relu(self.conv2(h)))
        return self.head(h.mean(2))


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, 16, generator=g)
    x[:, 0] *= (0.2 + 1.8 * y.float()).view(-1, 1)  # the class is the amplitude of channel 0
    return [(x[i : i + 100], y[i : i + 100]) for i in range(0, n, 100)]


def test_useless_residual_block_dropped_useful_block_kept():
    model, data = Net().eval(), _data()
    x = data[0][0][:2]
    gm = fxslim.trace(model)
    assert [(b.kind, b.end) for b in lacd_drop.candidate_blocks(gm, (x,))] == [("plain", "act"), ("residual", "add")]
    res = lacd_drop.run(gm, PassContext(example_inputs=(x,), data=data), beta=0.005, calib_samples=400)
    rec = res.record
    assert rec["input_probe_accuracy"] < 0.75  # pooled raw input: the amplitude is not linearly visible
    probes = {p["block"]: p for p in rec["probes"]}
    assert probes["act"]["accuracy"] > 0.95 and probes["act"]["gain"] > 0.2
    assert abs(probes["add"]["gain"]) < 1e-9
    assert [d["block"] for d in rec["dropped"]] == ["add"]
    names = {n.target for n in res.module.graph.nodes if n.op == "call_module"}
    assert "conv1" in names and not {"conv2", "conv3"} & names
    torch.testing.assert_close(res.module(x), model(x), atol=1e-6, rtol=0)  # the branch was exactly zero
    assert "conv3" in {n.target for n in gm.graph.nodes if n.op == "call_module"}  # input untouched


def test_plain_block_with_new_channel_count_gets_a_least_squares_projection():
    model, data = Net().eval(), _data()
    x = data[0][0][:2]
    gm = fxslim.trace(model)
    res = lacd_drop.run(gm, PassContext(example_inputs=(x,), data=data), beta=2.0, calib_samples=200)
    dropped = {d["block"]: d for d in res.record["dropped"]}
    assert dropped["act"]["projection"] and "add" in dropped
    assert res.module(x).shape == (2, 2)


def test_needs_labelled_data():
    gm, x = fxslim.trace(Net()), torch.randn(2, 2, 16)
    with pytest.raises(fxslim.PassError, match="data="):
        lacd_drop.run(gm, PassContext(example_inputs=(x,)))
    with pytest.raises(fxslim.RecipeError, match="calib_samples"):
        lacd_drop.run(gm, PassContext(example_inputs=(x,), data=_data()), calib_samples=3)
