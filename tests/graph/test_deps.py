"""Dependency analyzer, one coupling per test: Before model → groups (exact sizes and members) → pruned
After model (exact shapes, weights at the right offsets, outputs where the channels removed were dead)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.rewrite import ChannelPlan, apply_plan, remove_channels


def _group(dg, node, dim=1):
    g = dg.group_of(node, dim)
    assert g is not None, f"no group through {node}[{dim}]"
    return g


def _members(g):
    return {(m.node, m.dim) for m in g.members}


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


class Residual(nn.Module):
    """Chains of adds and an add of adds: every addend's channels are one group."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.f = nn.Conv2d(c, c, 3, padding=1)
        self.g = nn.Conv2d(c, c, 1)
        self.h = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = x + self.f(x)  # chain of adds
        y = y + self.g(y)
        z = (self.h(y) + y) + (self.k(y) + y)  # add of adds
        return self.head(z)


def test_residual_chains_and_adds_of_adds_form_one_group():
    dg = fxslim.analyze(Residual(), (torch.randn(1, 3, 8, 8),))
    g = _group(dg, "stem")
    assert g.size == 8 and g.prunable
    for producer in ("f", "g", "h", "k"):
        assert dg.group_of(producer) is g
    assert ("head", 1) not in _members(g)  # head's outputs are the model output: their own, frozen group
    assert dg.group_of("head").prunable is False
    assert len(dg.prunable_groups) == 1


def test_residual_group_pruned_consistently():
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    new = remove_channels(gm, _group(dg, "stem"), [0, 2, 5])
    for name in ("stem", "f", "g", "h", "k"):
        assert new.get_submodule(name).out_channels == 3
    assert new.head.in_channels == 3
    torch.testing.assert_close(new.f.weight, model.f.weight[[0, 2, 5]][:, [0, 2, 5]])
    assert new(x).shape == (1, 4, 8, 8)


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)
        self.d = nn.Conv2d(15, 2, 1)

    def forward(self, x):
        x = self.a(x)
        x = torch.cat([x, self.b(x)], 1)  # DenseNet-style: 4 + 6
        x = torch.cat([x, self.c(x)], 1)  # 10 + 5
        return self.d(x)


def test_concat_keeps_producers_separate_and_maps_offsets():
    model = Dense().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    ga, gb, gc = _group(dg, "a"), _group(dg, "b"), _group(dg, "c")
    assert (ga.size, gb.size, gc.size) == (4, 6, 5)
    assert len({ga.index, gb.index, gc.index}) == 3
    assert ("cat_1", 1) in _members(ga) and ("cat_1", 1) in _members(gc)
    plan = ChannelPlan(dg).remove(ga, [1, 3]).remove(gb, [0, 5]).remove(gc, [4])
    new = apply_plan(gm, plan)
    # d's input columns: a's kept (1, 3), b's kept (4+0, 4+5), c's kept (10+4)
    torch.testing.assert_close(new.d.weight, model.d.weight[:, [1, 3, 4, 9, 14]])
    torch.testing.assert_close(new.c.weight, model.c.weight[[4]][:, [1, 3, 4, 9]])
    assert new(x).shape == (1, 2, 4, 4)


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 8, 3, padding=1)
        self.b = nn.Conv1d(4, 3, 1)
        self.c = nn.Conv1d(4, 3, 1)
        self.d = nn.Conv1d(2, 3, 1)

    def forward(self, x):
        x = self.a(x)
        p, q = x.chunk(2, dim=1)
        r = x[:, 6:]  # slicing
        return self.b(p) + self.c(q) + self.d(r)


def test_chunk_and_slices_are_rewritten_with_new_sizes():
    model = Splits().eval()
    x = torch.randn(2, 2, 5)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert g.size == 8
    keep = [0, 1, 2, 4, 7]  # chunk 1 keeps 3, chunk 2 keeps 2; slice [6:] keeps channel 7 only
    new = remove_channels(gm, g, keep)
    assert (new.b.in_channels, new.c.in_channels, new.d.in_channels) == (3, 2, 1)
    n = _nodes(new)
    assert n["chunk"].target is torch.split and n["chunk"].args[1] == [3, 2]
    assert n["getitem_2"].args[1] == (slice(None), slice(4, None))
    torch.testing.assert_close(new.d.weight, model.d.weight[:, [1]])
    assert new(x).shape == (2, 3, 5)


class Grouped(nn.Module):
    def __init__(self, depthwise=False):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=16 if depthwise else 4)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(self.b(self.a(x)))))


def test_grouped_conv_prunes_whole_groups():
    model = Grouped().eval()
    x = torch.randn(1, 3, 6, 6)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert dg.group_of("b") is g and g.size == 4  # a group of the grouped conv is one unit
    new = remove_channels(gm, g, [0, 3])
    assert (new.b.groups, new.b.in_channels, new.b.out_channels) == (2, 8, 8)
    assert new.a.out_channels == 8 and new.bn.num_features == 8 and new.c.in_channels == 8
    torch.testing.assert_close(new.b.weight, model.b.weight[[0, 1, 2, 3, 12, 13, 14, 15]])
    assert new(x).shape == (1, 4, 6, 6)


def test_depthwise_conv_channels_follow_their_input():
    model = Grouped(depthwise=True).eval()
    x = torch.randn(1, 3, 6, 6)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert dg.group_of("b") is g and g.size == 16
    new = remove_channels(gm, g, list(range(0, 16, 2)))
    assert (new.b.groups, new.b.in_channels, new.b.out_channels) == (8, 8, 8)
    torch.testing.assert_close(new.b.weight, model.b.weight[::2])


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


def test_flatten_linear_removes_each_channels_spatial_block():
    model = FlattenHead().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "conv")
    assert g.size == 4 and ("flatten", 1) in _members(g)
    new = remove_channels(gm, g, [1, 3])
    assert new.fc.in_features == 8
    torch.testing.assert_close(new.fc.weight, model.fc.weight[:, [4, 5, 6, 7, 12, 13, 14, 15]])


class PermuteBackAndForth(nn.Module):
    """Channels-last detour: (N, C, L) → (N, L, C) → Linear over C → LayerNorm → back → conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 6, 1)
        self.fc = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.b = nn.Conv1d(6, 3, 1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 1)
        y = self.ln(self.fc(y) + y)
        y = y.transpose(1, 2).reshape(x.shape[0], 6, -1)
        return self.b(y)


def test_permute_transpose_reshape_and_layernorm_over_channels():
    model = PermuteBackAndForth().eval()
    x = torch.randn(2, 2, 5)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert dg.group_of("fc", 2) is g and dg.group_of("ln", 2) is g and g.size == 6
    new = remove_channels(gm, g, [0, 2, 3])
    assert new.ln.normalized_shape == (3,) and new.fc.in_features == 3 and new.b.in_channels == 3
    assert _nodes(new)["reshape"].args[2] == 3  # the literal 6 in reshape(..., 6, -1) is updated
    assert new(x).shape == (2, 3, 5)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s)


def test_squeeze_excitation_gate_is_coupled_to_its_input():
    dg = fxslim.analyze(SqueezeExcite(), (torch.randn(1, 3, 8, 8),))
    g = _group(dg, "conv")
    assert dg.group_of("fc2") is g and g.size == 8
    assert dg.group_of("fc1").size == 2 and dg.group_of("fc1") is not g


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.c(y)


def test_channel_shuffle_couples_partner_channels():
    model = Shuffle().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert dg.group_of("b") is g and g.size == 4  # channel i of a and channel i of b move together
    new = remove_channels(gm, g, [1, 2])
    assert new.a.out_channels == 2 and new.b.out_channels == 2 and new.c.in_channels == 4
    # after the shuffle, channel 2i+j comes from branch j, channel i
    torch.testing.assert_close(new.c.weight, model.c.weight[:, [2, 3, 4, 5]])
    assert new(x).shape == (1, 2, 4, 4)


class Attention(nn.Module):
    def __init__(self, e=16, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.o = nn.Linear(e, e)

    def forward(self, x):
        b, t, e = x.shape
        q = self.q(x).view(b, t, self.h, e // self.h).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, e // self.h).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, e // self.h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, e)) + x


def test_attention_heads_are_removed_whole():
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "q", 2)
    assert g.size == 4 and dg.group_of("k", 2) is g and dg.group_of("v", 2) is g  # one unit per head
    new = remove_channels(gm, g, [0, 2])
    rows = [0, 1, 2, 3, 8, 9, 10, 11]
    torch.testing.assert_close(new.q.weight, model.q.weight[rows])
    torch.testing.assert_close(new.o.weight, model.o.weight[:, rows])
    assert new(x).shape == (2, 5, 16)
    # with heads 1 and 3 made dead (zero value rows), removing them is exact
    with torch.no_grad():
        for i in (1, 3):
            model.v.weight[4 * i : 4 * i + 4] = 0
            model.v.bias[4 * i : 4 * i + 4] = 0
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    torch.testing.assert_close(remove_channels(gm, _group(dg, "q", 2), [0, 2])(x), model(x), atol=1e-5, rtol=0)


def test_multihead_attention_embedding_is_frozen_but_mlp_prunes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.fc2(torch.relu(self.fc1(x)))

    x = torch.randn(2, 5, 16)
    dg = fxslim.analyze(Block(), (x,))
    assert dg.group_of("fc2", 2).prunable is False
    assert "MultiheadAttention" in dg.group_of("fc2", 2).reason or "output" in dg.group_of("fc2", 2).reason
    assert dg.group_of("fc1", 2).prunable and dg.group_of("fc1", 2).size == 32


def test_unknown_op_is_frozen_and_listed():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)
            self.c = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            y = torch.roll(self.a(x), 1, dims=1)  # no rule: must not be guessed elementwise
            return self.b(y + self.c(x))

    dg = fxslim.analyze(Weird(), (torch.randn(1, 3, 4, 4),))
    assert [u.target for u in dg.unsupported] == ["roll"]
    assert dg.group_of("a").prunable is False and "roll" in dg.group_of("a").reason
    assert dg.group_of("c").prunable is False  # coupled through the add to roll's output


def test_mean_and_sum_over_dims():
    class Reduce(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)
            return self.fc(y.mean((2, 3)) + y.sum(dim=[2, 3]))

    model = Reduce().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "a")
    assert g.size == 8 and dg.group_of("mean", 1) is g
    assert remove_channels(gm, g, [0, 1, 2]).fc.in_features == 3


def test_ignore_freezes_a_module():
    dg = fxslim.analyze(Grouped(), (torch.randn(1, 3, 6, 6),), ignore=["b"])
    assert dg.group_of("a").prunable is False and "ignore" in dg.group_of("a").reason
    with pytest.raises(fxslim.AnalysisError, match="nope"):
        fxslim.analyze(Grouped(), (torch.randn(1, 3, 6, 6),), ignore=["nope"])


def test_merge_classes_separate_the_two_sides_of_a_split():
    dg = fxslim.analyze(Splits(), (torch.randn(2, 2, 5),))
    classes = dg.merge_classes(_group(dg, "a"))
    assert sorted(map(list, classes)) == [[0, 1, 2, 3], [4, 5], [6, 7]]


def test_analysis_has_no_per_channel_cost():
    """A wide net is analysed with array work, not per-channel Python: ids per dim, one union-find."""
    wide = nn.Sequential(nn.Conv2d(3, 4096, 1), nn.ReLU(), nn.Conv2d(4096, 4096, 1), nn.Conv2d(4096, 2, 1))
    dg = fxslim.analyze(wide, (torch.randn(1, 3, 2, 2),))
    assert [g.size for g in dg.groups] == [4096, 4096, 2]
    assert np.array_equal(dg.groups[0].atoms, np.sort(dg.groups[0].atoms))


def test_reshape_to_a_computed_shape_object_is_left_to_run_time():
    class ShuffleBack(Shuffle):
        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            n, c = y.shape[0], y.shape[1]
            return self.c(y.view(n, 2, c // 2, -1).transpose(1, 2).reshape(y.shape))

    model = ShuffleBack().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    new = remove_channels(gm, _group(dg, "a"), [0, 3])
    torch.testing.assert_close(new.c.weight, model.c.weight[:, [0, 1, 6, 7]])


class MHABlock(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.inp = nn.Linear(16, 16)  # the residual stream starts here (a model input is never pruned)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attn(x, x, x)[0]
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_removed_whole(batch_first):
    from fxslim.modules import SlimMultiheadAttention

    torch.manual_seed(0)
    model = MHABlock(batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    heads = [g for g in dg.prunable_groups if g.size == 4]
    assert len(heads) == 1 and {m.node for m in heads[0].members} == {"attn.in_proj_weight", "attn.in_proj_bias",
                                                                    "attn.out_proj.weight"}
    # heads 1 and 3 made dead: their value rows are zero, so removing them is exact
    with torch.no_grad():
        for h in (1, 3):
            model.attn.in_proj_weight[32 + 4 * h : 32 + 4 * h + 4] = 0
            model.attn.in_proj_bias[32 + 4 * h : 32 + 4 * h + 4] = 0
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = next(g for g in dg.prunable_groups if g.size == 4)
    new = remove_channels(gm, g, [0, 2])
    assert isinstance(new.attn, SlimMultiheadAttention) and new.attn.num_heads == 2 and new.attn.head_dim == 4
    assert tuple(new.attn.in_proj_weight.shape) == (24, 16) and new.attn.out_proj.in_features == 8
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=0)
    # a second round analyses the replacement module with the same rule
    dg2 = fxslim.analyze(new, (x,))
    assert sorted(g.size for g in dg2.prunable_groups) == [2, 16, 32]


def test_multihead_attention_stream_and_mlp_prune_together():
    model = MHABlock().eval()
    x = torch.randn(2, 5, 16)
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
    assert res.module(x).shape == (2, 5, 3)
    assert res.module.attn.in_proj_weight.shape == (24, 8)  # 2 heads of 4, stream 16 -> 8


def test_used_attention_weights_freeze_the_heads():
    class Weights(MHABlock):
        def forward(self, x):
            y, w = self.attn(self.inp(x), x, x)
            return self.head(x + y), w

    dg = fxslim.analyze(Weights(), (torch.randn(2, 5, 16),))
    assert not any(g.size == 4 and g.prunable for g in dg.groups)


def test_einsum_gather_and_size_arithmetic_have_rules():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(6, 8)
            self.out = nn.Linear(8, 3)
            self.table = nn.Parameter(torch.randn(5, 8))
            self.register_buffer("index", torch.tensor([0, 2, 4, 1]))

        def forward(self, x):  # x: (B, T, 6)
            q, k = self.a(x), self.b(x)
            scores = torch.einsum("b i d, b j d -> b i j", q, k) / (x.shape[-1] * 2)
            y = torch.einsum("bij,bjd->bid", scores.softmax(-1), k) + self.table[self.index]
            return self.out(y.swapaxes(0, 1).swapaxes(0, 1))

    x = torch.randn(2, 4, 6)
    model = Mix().eval()
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    assert dg.unsupported == []
    g = _group(dg, "a", 2)  # q and k (contracted over d), the table's columns and out's inputs
    assert dg.group_of("b", 2) is g and g.size == 8 and ("table", 1) in _members(g)
    assert ("table", 0) not in _members(g)  # rows picked by the index tensor stay whole
    with torch.no_grad():  # channels 4..7 dead everywhere: removing them is exact
        for t in (model.a.weight, model.a.bias, model.b.weight, model.b.bias):
            t[4:] = 0
        model.table[:, 4:] = 0
        model.out.weight[:, 4:] = 0
    gm = fxslim.trace(model)
    new = remove_channels(gm, _group(fxslim.analyze(gm, (x,)), "a", 2), [0, 1, 2, 3])
    assert new.table.shape == (5, 4) and new.out.in_features == 4
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fields", [4, 6])
def test_unflatten_into_groups_keeps_whole_groups(fields):
    """Group pooling (max over the 4 members of each field): a field is the unit, the literal 4 stays."""

    class GroupPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4 * fields, 3, padding=1)
            self.fc = nn.Linear(fields, 3)

        def forward(self, x):
            return self.fc(self.conv(x).unflatten(1, (-1, 4)).amax(2).mean((2, 3)))

    model = GroupPool().eval()
    x = torch.randn(2, 1, 6, 6)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    g = _group(dg, "conv")
    assert g.size == fields  # one unit per field of 4 channels
    new = remove_channels(gm, g, [0, 2])
    assert new.conv.out_channels == 8 and new.fc.in_features == 2
    assert _nodes(new)["unflatten"].args[2] == (-1, 4)
    torch.testing.assert_close(new.conv.weight, model.conv.weight[[0, 1, 2, 3, 8, 9, 10, 11]])


def test_unpacked_but_unused_attention_weights_do_not_freeze_the_heads():
    class Unpacked(MHABlock):  # torchvision's ViT: `x, _ = self.self_attention(x, x, x, need_weights=False)`
        def forward(self, x):
            x = self.inp(x)
            y, _ = self.attn(x, x, x, need_weights=False)
            return self.head(x + y)

    dg = fxslim.analyze(Unpacked(), (torch.randn(2, 5, 16),))
    assert sorted(g.size for g in dg.prunable_groups) == [4, 16]


def test_dim_groups_looks_up_a_shared_id_array_once_with_the_same_answer():
    """Dims holding the very same id array and dims holding equal copies give identical (dim, group)
    pairs, sorted by dim then group; dims of no group give none."""
    from fxslim.graph.deps import _dim_groups

    label = np.arange(10)
    atom_group = np.array([0, 0, 1, 1, -1, -1, 2, 0, 2, -1])
    a, b, c = np.array([0, 1, 2, 3]), np.array([4, 5, 9]), np.array([6, 7, 8, 1])
    shared = [("n0", 1, a), ("n1", 1, b), ("n2", 1, a), ("n3", 0, c), ("n4", 1, a), ("p", 0, c)]
    copies = [(n, k, ids.copy()) for n, k, ids in shared]
    want = [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (3, 2), (4, 0), (4, 1), (5, 0), (5, 2)]
    assert _dim_groups(shared, atom_group, label) == want
    assert _dim_groups(copies, atom_group, label) == want
    assert _dim_groups([("n", 0, b)], atom_group, label) == []


def test_slice_after_ellipsis_is_moved_with_the_removed_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 48), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.fc(x)[..., 16:32])

    model, x = M().eval(), torch.randn(3, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    keep = [i for i in range(48) if i not in (0, 1, 2, 3, 40, 41, 42, 43)]
    new = remove_channels(gm, dg.group_of("fc"), keep)
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)


def test_1d_and_3d_resizing_keep_channels_prunable():
    class M(nn.Module):
        def __init__(self, dims):
            super().__init__()
            conv = nn.Conv1d if dims == 1 else nn.Conv3d
            self.a, self.b = conv(2, 8, 1), conv(8, 3, 1)
            self.up = nn.Upsample(scale_factor=2) if dims == 1 else None

        def forward(self, x):
            y = self.a(x)
            y = self.up(y) if self.up is not None else F.interpolate(y, scale_factor=2.0)
            return self.b(y)

    for dims, shape in ((1, (1, 2, 6)), (3, (1, 2, 2, 2, 2))):
        model, x = M(dims).eval(), torch.randn(*shape)
        res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
        assert res.module.a.out_channels == 4 and res.module(x).shape == model(x).shape


def test_masked_fill_mask_follows_the_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
            self.register_buffer("mask", torch.arange(8).view(1, 8, 1, 1) % 3 == 0)

        def forward(self, x):
            return self.b(self.a(x).masked_fill(self.mask, 0.0))

    model, x = M().eval(), torch.randn(1, 3, 4, 4)
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
    assert res.module(x).shape == (1, 2, 4, 4) and res.module.mask.shape == (1, 4, 1, 1)


def test_unusual_keyword_arguments_freeze_instead_of_crashing():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):  # x: (B, T, 4)
            y = self.a(x).transpose(dim0=1, dim1=2)
            return self.b(y.sum(axis=2))

    dg = fxslim.analyze(M(), (torch.randn(2, 3, 4),))
    assert [u.target for u in dg.unsupported] == ["transpose"]
    g = _group(dg, "a", 2)  # a's outputs stop at the transpose its rule cannot read: their own, frozen group
    assert g.size == 6 and _members(g) == {("a", 2), ("a.weight", 0), ("a.bias", 0)}
    assert g.frozen.all() and not g.prunable and "transpose" in g.reason
    assert [g.size for g in dg.groups] == [6, 2] and dg.prunable_groups == []
