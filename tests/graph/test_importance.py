"""atom_scores against scores written out by hand on a small conv → BN → conv → linear net; a PReLU slope
is not a norm scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
from fxslim.graph.deps import analyze
from fxslim.importance import atom_scores


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        x = self.c2(torch.relu(self.bn(self.c1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _expected(m: Net, criterion: str) -> dict[str, np.ndarray]:
    """Per-channel score of each prunable layer, summed over every tensor slice the channel owns."""
    f = (lambda t: t.detach().abs()) if criterion == "l1" else (lambda t: t.detach().pow(2))
    c1 = f(m.c1.weight).sum((1, 2, 3)) + f(m.c1.bias) + f(m.bn.weight) + f(m.bn.bias) + f(m.c2.weight).sum((0, 2, 3))
    c2 = f(m.c2.weight).sum((1, 2, 3)) + f(m.c2.bias) + f(m.fc1.weight).sum(0)
    fc1 = f(m.fc1.weight).sum(1) + f(m.fc1.bias) + f(m.fc2.weight).sum(0)
    out = {"c1": c1, "c2": c2, "fc1": fc1}
    return {k: (v.sqrt() if criterion == "l2" else v).double().numpy() for k, v in out.items()}


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_scores_equal_the_hand_written_sums(criterion):
    torch.manual_seed(0)
    m = Net().eval()
    nn.init.normal_(m.bn.weight)
    nn.init.normal_(m.bn.bias)
    gm = fxslim.trace(m)
    dg = analyze(gm, (torch.randn(2, 3, 8, 8),))
    scores = atom_scores(dg, criterion)
    want = _expected(m, criterion)
    for layer in ("c1", "c2", "fc1"):
        group = dg.group_of(layer, 1)  # the layer's output channels (dim 1)
        np.testing.assert_allclose(scores[group.atoms], want[layer], rtol=1e-5, err_msg=f"{criterion} {layer}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scores_of_1x1_and_3x3_kernels_in_either_memory_layout(layout):
    """Kernels are summed by a matrix-vector product, 1x1 kernels need no sum at all; weights stored
    channels_last give the same hand-written sums."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))
    if layout == "channels_last":
        m = m.to(memory_format=torch.channels_last)
        assert not m[2].weight.is_contiguous()
    dg = analyze(fxslim.trace(m.eval()), (torch.randn(1, 3, 6, 6),))
    scores = atom_scores(dg, "l1")
    w0, w2, w4 = (m[i].weight.detach().abs() for i in (0, 2, 4))
    want = {
        "_0": w0.sum((1, 2, 3)) + m[0].bias.detach().abs() + w2.sum((0, 2, 3)),
        "_2": w2.sum((1, 2, 3)) + m[2].bias.detach().abs() + w4.sum((0, 2, 3)),
    }
    for layer, expected in want.items():
        group = dg.group_of(layer, 1)
        np.testing.assert_allclose(scores[group.atoms], expected.double().numpy(), rtol=1e-5, err_msg=layer)


def test_bn_scale_scores_are_the_norm_weights_where_a_group_has_one():
    torch.manual_seed(2)
    m = Net().eval()
    nn.init.normal_(m.bn.weight)
    dg = analyze(fxslim.trace(m), (torch.randn(2, 3, 8, 8),))
    scores = atom_scores(dg, "bn_scale")
    np.testing.assert_allclose(scores[dg.group_of("c1", 1).atoms], m.bn.weight.detach().abs().double().numpy(),
                               rtol=1e-6)
    # c2's group has no norm layer: it falls back to l1
    np.testing.assert_allclose(scores[dg.group_of("c2", 1).atoms], _expected(m, "l1")["c2"], rtol=1e-5)


def test_scores_do_not_depend_on_the_default_dtype():
    """The scratch buffer follows the weights' float32, so no score is a view of it that a later weight
    overwrites (as it would be under a float64 default dtype if the buffer took the default)."""
    torch.manual_seed(3)
    m = Net().eval()
    nn.init.normal_(m.bn.weight)
    dg = analyze(fxslim.trace(m), (torch.randn(2, 3, 8, 8),))
    want = atom_scores(dg, "bn_scale")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = atom_scores(dg, "bn_scale")
    finally:
        torch.set_default_dtype(old)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_prelu_slope_is_not_a_norm_scale():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 2, 1))
    dg = fxslim.analyze(model, (torch.randn(1, 3, 2, 2),))
    g = dg.group_of("_0")
    assert list(atom_scores(dg, "bn_scale")[g.atoms]) == list(atom_scores(dg, "l1")[g.atoms])
