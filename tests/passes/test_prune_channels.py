"""prune_channels with objective="macs", as before/after pairs: a Before chain whose weights are written by
hand (so every channel's importance is known) → run the pass → the After module must equal an Expected chain
built by slicing Before's weights to the kept channels, parameter for parameter. One case per option:
`ratio` (floor(ratio * C) channels go per group), `importance` (l1, l2, bn_scale, random with a seed),
`ignore`, `global_ranking`, `round_to`. The latency objective has its own file (test_prune_channels_latency.py).

The Before chain is a (2 -> 6) -> [bn] -> relu -> b (6 -> 4) -> relu -> c (4 -> 2), all 1x1 convs, so it has
two prunable groups: A = a's 6 outputs (with bn, and b's input columns) and B = b's 4 outputs (c's input
columns); c's outputs are the model's and stay. Its weights:

    a.weight rows   ch0 (3, 0)  ch1 (1, 1)  ch2 (2, 2)  ch3 (0.5, 0)  ch4 (2.5, 0)  ch5 (1.4, 1.4)
    b.weight        row j is S[j] everywhere, S = (0.05, 0.06, 0.07, 1.0)
    c.weight        0.01 everywhere (c.bias: 0.5, -0.5)
    bn.weight       (-0.3, 0.9, 0.1, 0.8, -0.5, 0.7) (the chain with a norm only)

so every b column adds the same to each A channel (sum S = 1.18 to l1, sum S² = 1.0110 to l2²), and

    A  l1  4.18  3.18  5.18  1.68  3.68  3.98    ascending: 3 1 4 5 0 2
       l2² 10.01 3.01  9.01  1.26  7.26  4.93   ascending: 3 1 5 4 2 0
       |γ| 0.3   0.9   0.1   0.8   0.5   0.7    ascending: 2 0 4 5 3 1
    B  l1  0.32  0.38  0.44  6.02  (6 S[j] + 2 x 0.01)   ascending: 0 1 2 3
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn

import fxslim
from fxslim.errors import PassError
from fxslim.graph.deps import analyze
from fxslim.pass_api import PassContext, PassResult
from fxslim.passes import prune_channels

A_ROWS = [[3.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.5, 0.0], [2.5, 0.0], [1.4, 1.4]]
S = [0.05, 0.06, 0.07, 1.0]
GAMMA = [-0.3, 0.9, 0.1, 0.8, -0.5, 0.7]
X = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))


class Chain(nn.Module):
    def __init__(self, wa: int = 6, wb: int = 4, norm: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, wa, 1, bias=False)
        self.bn = nn.BatchNorm2d(wa) if norm else nn.Identity()
        self.b = nn.Conv2d(wa, wb, 1, bias=False)
        self.c = nn.Conv2d(wb, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))))


def before(norm: bool = False) -> Chain:
    """The Before chain with the weights of the module docstring (BN statistics non-trivial too)."""
    m = Chain(norm=norm)
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor(A_ROWS).view(6, 2, 1, 1))
        m.b.weight.copy_(torch.tensor(S).view(4, 1, 1, 1).expand(4, 6, 1, 1))
        m.c.weight.fill_(0.01)
        m.c.bias.copy_(torch.tensor([0.5, -0.5]))
        if norm:
            m.bn.weight.copy_(torch.tensor(GAMMA))
            m.bn.bias.copy_(torch.linspace(-0.2, 0.3, 6))
            m.bn.running_mean.copy_(torch.linspace(-1.0, 1.0, 6))
            m.bn.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    return m.eval()


def expected(model: Chain, keep_a: list[int], keep_b: list[int]) -> Chain:
    """The After chain written by hand: Before's weights with only the kept channels' rows and columns."""
    norm = isinstance(model.bn, nn.BatchNorm2d)
    out = Chain(len(keep_a), len(keep_b), norm=norm)
    with torch.no_grad():
        out.a.weight.copy_(model.a.weight[keep_a])
        if norm:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(out.bn, name).copy_(getattr(model.bn, name)[keep_a])
        out.b.weight.copy_(model.b.weight[keep_b][:, keep_a])
        out.c.weight.copy_(model.c.weight[:, keep_b])
        out.c.bias.copy_(model.c.bias)
    return out.eval()


def prune(model: Chain, seed: int = 0, **options) -> tuple[fx.GraphModule, PassResult]:
    gm = fxslim.trace(model)
    return gm, prune_channels.run(gm, PassContext(example_inputs=(X,), seed=seed), **options)


def assert_equal_modules(got: nn.Module, want: nn.Module) -> None:
    """Same parameters and buffers, bit for bit, and the same outputs."""
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key
    torch.testing.assert_close(got(X), want(X), rtol=0, atol=0)


def assert_pruned(model: Chain, res: PassResult, keep_a: list[int], keep_b: list[int]) -> None:
    assert res.changed
    assert_equal_modules(res.module, expected(model, keep_a, keep_b))
    removed = [6 - len(keep_a), 4 - len(keep_b)]
    assert res.record["removed"] == sum(removed)
    per_group = [(g["size"], g["removed"], g["kept"]) for g in res.record["per_group"]]
    assert per_group == [(6, removed[0], len(keep_a)), (4, removed[1], len(keep_b))]


@pytest.mark.parametrize(
    "ratio, keep_a, keep_b",
    [
        (0.5, [0, 2, 5], [2, 3]),  # A loses floor(3.0) = 3, B floor(2.0) = 2
        (0.2, [0, 1, 2, 4, 5], [0, 1, 2, 3]),  # A loses floor(1.2) = 1, B floor(0.8) = 0
        (0.9, [2], [3]),  # A loses floor(5.4) = 5, B floor(3.6) = 3: the best channel of each stays
    ],
)
def test_l1_removes_floor_ratio_times_c_lowest_channels_per_group(ratio, keep_a, keep_b):
    model = before()
    gm, res = prune(model, ratio=ratio, importance="l1")
    assert_pruned(model, res, keep_a, keep_b)
    assert_equal_modules(gm, before())  # the pass never edits the module it is given


def test_l2_ranks_by_root_sum_of_squares():
    """ch4 (2.5, 0) beats ch5 (1.4, 1.4) under l2 but not under l1: l2 keeps ch4, l1 keeps ch5."""
    model = before()
    _, res = prune(model, ratio=0.5, importance="l2")
    assert_pruned(model, res, [0, 2, 4], [2, 3])


def test_bn_scale_ranks_a_normed_group_by_gamma_and_the_others_by_l1():
    model = before(norm=True)
    _, res = prune(model, ratio=0.5, importance="bn_scale")
    assert_pruned(model, res, [1, 3, 5], [2, 3])  # A: the smallest |γ| (ch2, ch0, ch4) go; B has no norm: l1


def test_random_removes_the_lowest_of_the_seeded_draw():
    """importance="random": one uniform draw per channel from numpy's default_rng(seed), the recipe seed;
    weights play no part."""
    model = before()
    dg = analyze(fxslim.trace(model), (X,))
    groups = dg.group_of("a"), dg.group_of("b")
    choices = []
    for seed in range(4):
        draw = np.random.default_rng(seed).random(int(dg.label.max()) + 1)
        keep_a, keep_b = (sorted(np.argsort(draw[g.atoms], kind="stable")[g.size // 2 :].tolist()) for g in groups)
        _, res = prune(model, seed=seed, ratio=0.5, importance="random")
        assert_pruned(model, res, keep_a, keep_b)
        _, again = prune(model, seed=seed, ratio=0.5, importance="random")
        assert_equal_modules(again.module, res.module)
        choices.append((keep_a, keep_b))
    assert len({str(c) for c in choices}) > 1  # the seed decides


def test_ignore_keeps_every_channel_of_the_ignored_module():
    model = before()
    _, res = prune(model, ratio=0.5, ignore=["a"])  # A frozen (a's outputs); B pruned as without ignore
    assert res.changed and res.record["groups"] == 1
    assert_equal_modules(res.module, expected(model, list(range(6)), [2, 3]))
    assert [(g["size"], g["removed"]) for g in res.record["per_group"]] == [(4, 2)]
    with pytest.raises(PassError, match="prunable"):  # b's inputs and outputs: both groups frozen
        prune(model, ratio=0.5, ignore=["b"])


def test_global_ranking_takes_the_same_total_from_one_ranking_of_mean_normalised_scores():
    """Scores over their group's mean: A 1.15 0.87 1.42 0.46 1.01 1.09, B 0.18 0.21 0.25 3.36. Of the 10
    channels floor(0.5 x 10) = 5 go: B's three low ones, then A's ch3 and ch1 (per group: 3 of A, 2 of B)."""
    model = before()
    _, res = prune(model, ratio=0.5, global_ranking=True)
    assert_pruned(model, res, [0, 2, 4, 5], [3])


@pytest.mark.parametrize(
    "round_to, keep_a, keep_b",
    [
        (2, [0, 2, 4, 5], [2, 3]),  # A keeps 3 -> 4 (halves round up), B keeps 2
        (4, [0, 2, 4, 5], [0, 1, 2, 3]),  # A keeps 3 -> 4, B keeps 2 -> 4 (halves up): whole
    ],
)
def test_round_to_rounds_each_kept_count_to_a_multiple(round_to, keep_a, keep_b):
    model = before()
    _, res = prune(model, ratio=0.5, round_to=round_to)
    assert_pruned(model, res, keep_a, keep_b)


def test_round_to_larger_than_every_group_changes_nothing():
    model = before()
    gm, res = prune(model, ratio=0.5, round_to=8)  # A (6) and B (4) are smaller than one unit: both whole
    assert not res.changed and res.module is gm
    assert res.record["removed"] == 0 and res.record["groups"] == 2


def test_ratio_zero_changes_nothing():
    model = before()
    gm, res = prune(model, ratio=0.0)
    assert not res.changed and res.module is gm and res.record["removed"] == 0
