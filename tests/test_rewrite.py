"""Rewrite primitives: each returns a NEW GraphModule that lints, runs and keeps the planned shapes (a
size the graph reads from a resized tensor included), and shares no module or hook with its input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
import fxslim.rewrite as rewrite
from fxslim.graph.clone import clone_gm
from fxslim.rewrite import (
    ChannelPlan,
    _Applier,
    apply_plan,
    drop_block,
    merge_channels,
    remove_channels,
    replace_module,
    verify_shapes,
)
from fxslim.scratch import Scratch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.f = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.f(y)
        return self.head(y)


def _setup():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = fxslim.trace(model)
    return model, x, gm, fxslim.analyze(gm, (x,))


def test_remove_channels_slices_every_member_and_keeps_input():
    model, x, gm, dg = _setup()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    g = dg.group_of("a")
    new = remove_channels(gm, g, np.array([True, False, True, True, False, True]))
    assert new is not gm and all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(new.bn.running_var, model.bn.running_var[keep])
    torch.testing.assert_close(new.head.weight, model.head.weight[:, keep])
    torch.testing.assert_close(new.f.weight, model.f.weight[keep][:, keep])
    new.graph.lint()
    assert new(x).shape == (2, 2, 5, 5)


def test_merge_channels_averages_producers_and_sums_consumers():
    model, x, gm, dg = _setup()
    g = dg.group_of("a")
    new = merge_channels(gm, g, [[1, 4], [2, 3, 5]])
    assert new.a.out_channels == 3 and new.bn.num_features == 3
    torch.testing.assert_close(new.a.weight[1], (model.a.weight[1] + model.a.weight[4]) / 2)
    torch.testing.assert_close(new.bn.running_mean[2], model.bn.running_mean[[2, 3, 5]].mean())
    torch.testing.assert_close(new.head.weight[:, 2], model.head.weight[:, [2, 3, 5]].sum(1))
    torch.testing.assert_close(new.f.weight[0, 1], model.f.weight[0, [1, 4]].sum(0))
    weights = np.array([1.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    l1 = merge_channels(gm, g, [[1, 4]], how="l1", weights=weights)
    torch.testing.assert_close(l1.a.weight[1], (3 * model.a.weight[1] + model.a.weight[4]) / 4)


def test_plan_errors_are_typed():
    _, _, gm, dg = _setup()
    g = dg.group_of("a")
    with pytest.raises(fxslim.PassError, match="keep at least one"):
        ChannelPlan(dg).remove(g, [])
    with pytest.raises(fxslim.PassError, match="out of range"):
        ChannelPlan(dg).remove(g, [9])
    frozen = dg.group_of("head")
    with pytest.raises(fxslim.PassError, match="frozen"):
        ChannelPlan(dg).remove(frozen, [0])
    with pytest.raises(fxslim.PassError, match="how="):
        merge_channels(gm, g, [[0, 1]], how="max")


def test_replace_module_by_a_chain():
    model, x, gm, _ = _setup()
    a = model.f
    # an exact two-step chain: the conv, then an identity 1x1 conv
    eye = nn.Conv2d(6, 6, 1, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
    new = replace_module(gm, "f", [a, eye], example_inputs=(x,))
    assert isinstance(new.f, nn.Sequential) and len(new.f) == 2
    torch.testing.assert_close(new(x), gm(x), atol=1e-6, rtol=0)
    assert not isinstance(gm.f, nn.Sequential)
    with pytest.raises(fxslim.PassError, match="does not run.*'add'"):
        replace_module(gm, "f", nn.Conv2d(6, 6, 3), example_inputs=(x,))
    with pytest.raises(fxslim.PassError, match=r"'head' changed shape \(2, 2, 5, 5\) -> \(2, 3, 5, 5\)"):
        replace_module(gm, "head", nn.Conv2d(6, 3, 1), example_inputs=(x,))


def test_drop_block_makes_the_residual_branch_identity():
    model, x, gm, _ = _setup()
    new = drop_block(gm, "relu", "add", example_inputs=(x,))
    assert "f" not in dict(new.named_modules())
    y = torch.relu(model.bn(model.a(x)))
    torch.testing.assert_close(new(x), model.head(y))
    assert "f" in dict(gm.named_modules())


def test_drop_block_makes_inplace_ops_after_the_block_out_of_place():
    """torchvision-style: ReLU(inplace) after the add; with the block gone it would follow the previous block's
    ReLU, whose output autograd needs: training the result used to fail with an in-place modification error."""

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.relu = nn.ReLU(inplace=True)
            self.f = nn.Conv2d(4, 4, 1)
            self.relu2 = nn.ReLU(inplace=True)
            self.g = nn.Conv2d(4, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.relu(self.a(x))
            z = self.relu2(y + self.f(y))
            return self.head((z + self.g(z)).relu_())

    torch.manual_seed(0)
    model = Blocks()
    x = torch.randn(2, 3, 4, 4)
    gm = fxslim.trace(model)
    new = drop_block(drop_block(gm, "relu", "add", example_inputs=(x,)), "relu2", "add_1", example_inputs=(x,))
    new(x).sum().backward()  # raised "modified by an inplace operation" before
    assert model.relu2.inplace and gm.relu2.inplace and not new.relu2.inplace
    assert "relu" in [n.target for n in new.graph.nodes if n.op == "call_method"]
    torch.testing.assert_close(new(x), model.head(model.a(x).relu()))


def test_drop_block_with_projection_when_channels_differ():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.a(x))))

    model = Chain().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    with pytest.raises(fxslim.PassError):
        drop_block(gm, "a", "relu", example_inputs=(x,))
    proj = nn.Conv2d(4, 8, 1)
    new = drop_block(gm, "a", "relu", projection=proj, example_inputs=(x,))
    torch.testing.assert_close(new(x), model.c(proj(model.a(x))))


def test_a_broken_rewrite_is_caught_by_the_shape_check(monkeypatch):
    _, x, gm, dg = _setup()
    g = dg.group_of("a")
    keep = np.array([True, False, True, True, False, True])
    real = rewrite._reindex

    def producers_only(t, dim, dest, size, select, summed, weights, scratch=None):  # consumer columns unsliced
        return t if summed else real(t, dim, dest, size, select, summed, weights, scratch)

    monkeypatch.setattr(rewrite, "_reindex", producers_only)
    with pytest.raises(fxslim.PassError, match="does not run.*'f'"):
        remove_channels(gm, g, keep)


def test_shape_check_compares_every_node_with_the_plan():
    _, x, gm, dg = _setup()
    plan = ChannelPlan(dg).remove(dg.group_of("a"), [0, 2, 3, 5])
    applier = _Applier(plan, {n.name: n for n in gm.graph.nodes}, gm)
    with pytest.raises(fxslim.PassError, match=r"node 'a' shape \[2, 6, 5, 5\], the plan expects \[2, 4, 5, 5\]"):
        verify_shapes(gm, (x,), applier)  # the unrewritten graph runs, with the old widths


def test_uncompiled_clone_compiles_on_its_own_class():
    _, x, gm, _ = _setup()
    before = type(gm).forward
    new = clone_gm(gm, compile=False)
    assert type(new) is not type(gm) and "recompile" not in vars(type(new))
    nodes = {n.name: n for n in new.graph.nodes}
    nodes["relu"].replace_all_uses_with(nodes["bn"])
    new.graph.erase_node(nodes["relu"])
    new.recompile()
    assert type(gm).forward is before and "relu" in gm.code and "relu" not in new.code
    y = gm.bn(gm.a(x))
    torch.testing.assert_close(new(x), gm.head(y + gm.f(y)))


def test_reindex_through_scratch_buffers_matches_plain_selection():
    """Steps before the last write alternating scratch buffers (each reads the one before); the last step's
    result owns its memory, and the values equal plain index_select along every dim."""
    t = torch.randn(6, 5, 4)
    dests = [np.array([0, -1, 1, 2, -1, 3]), np.array([-1, 0, 1, -1, 2]), np.array([0, -1, -1, 1])]
    want = t
    for dim, dest in enumerate(dests):
        want = want.index_select(dim, torch.from_numpy(np.flatnonzero(dest >= 0)))
    scratch = (Scratch(), Scratch())
    got = t
    for dim, dest in enumerate(dests):
        into = scratch[dim % 2] if dim < len(dests) - 1 else None
        got = rewrite._reindex(got, dim, dest, int((dest >= 0).sum()), True, False, np.ones(len(dest)), into)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (4, 3, 2)
    buffers = {b._buf.untyped_storage().data_ptr() for b in scratch}
    assert len(buffers) == 2 and got.untyped_storage().data_ptr() not in buffers


def test_matmul_with_a_parameter_sums_merged_columns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.proj = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return self.fc(x) @ self.proj

    model, x = M().eval(), torch.randn(5, 3)
    with torch.no_grad():
        model.fc.weight[1] = model.fc.weight[0]
        model.fc.bias[1] = model.fc.bias[0]
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    new = apply_plan(gm, ChannelPlan(dg).merge(dg.group_of("fc"), [[0, 1]]))
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=0)


def test_hooks_on_the_result_do_not_fire_on_the_input_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    res = fxslim.compress(model, (torch.randn(1, 3, 2, 2),), ["prune_channels"])
    calls = []
    res.module.get_submodule("1").register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 3, 2, 2))
    assert calls == []


@pytest.mark.parametrize("read", ["unpack", "size", "size_dim"])
def test_reshape_to_a_size_read_from_another_tensor_follows_the_plan(read):
    """MaxViT's attention merges heads back with the width of its input (`reshape(B, P, D)`, D from
    `x.shape`): when the residual width loses channels and the heads do not, the merged dim keeps its size,
    so the size read from the input must not be used any more."""

    class M(nn.Module):
        def __init__(self, d=16, heads=2, head_dim=8):
            super().__init__()
            self.inp, self.qkv = nn.Linear(4, d), nn.Linear(d, 3 * heads * head_dim)
            self.merge, self.head = nn.Linear(heads * head_dim, d), nn.Linear(d, 3)
            self.heads, self.head_dim = heads, head_dim

        def forward(self, x):
            x = self.inp(x)
            b, p, d = x.shape
            d = {"unpack": d, "size": x.size(2), "size_dim": x.size(dim=-1)}[read]
            q, k, v = self.qkv(x).chunk(3, -1)
            q, k, v = (t.reshape(b, p, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            out = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(b, p, d)
            return self.head(x + self.merge(out))

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(2, 5, 4)
    new = _without_dead_residual_half(model, x, ("inp", "merge"))
    assert new.inp.out_features == new.merge.out_features == 8 and new.merge.in_features == 16
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)


def test_a_size_read_from_channels_mixed_with_space_is_not_fixed():
    """`reshape(n, fa.size(1))` with fa a flatten of channels and space: its size changes with the input, so
    it is not replaced by a number; pruning fails loudly instead of giving a model that runs only at the
    example input's size."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

        def forward(self, x):
            fa = self.a(x).flatten(1)
            return fa.sum(1) + self.b(x).reshape(fa.size(0), fa.size(1)).sum(1)

    model, x = M().eval(), torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    with pytest.raises(fxslim.PassError, match="reshape"):
        remove_channels(gm, dg.group_of("a"), list(range(4)))


def test_a_slice_bounded_by_a_resized_size_still_prunes():
    """`b[:, : a.shape[1]]` reads a size the plan changes; only view/reshape/expand rewrite such sizes, the
    slice is left to its own rule (an update of it used to raise a TypeError)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.oa = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            return self.oa(a) + b[:, : a.shape[1]]

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(1, 3, 4, 4)
    with torch.no_grad():  # channels 4..7 of a carry nothing: removing them is exact
        model.a.weight[4:] = 0
        model.a.bias[4:] = 0
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    new = remove_channels(gm, dg.group_of("a"), list(range(4)))
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)


def test_reshape_to_a_size_computed_from_a_resized_width():
    """timm-style attention splits heads with `reshape(B, N, 3, heads, C // heads)`, C from its input: when the
    residual width loses channels and the heads do not, `C // heads` is computed from a resized size and
    becomes the head width the plan keeps."""

    class M(nn.Module):
        def __init__(self, d=16, heads=2):
            super().__init__()
            self.inp, self.qkv, self.proj = nn.Linear(4, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.head, self.heads = nn.Linear(d, 3), heads

        def forward(self, x):
            x = self.inp(x)
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            return self.head(x + self.proj(out))

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(2, 5, 4)
    new = _without_dead_residual_half(model, x, ("inp", "proj"))
    assert new.inp.out_features == new.proj.out_features == 8 and new.qkv.out_features == 48
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)
    assert new(torch.randn(3, 7, 4)).shape == (3, 7, 3)  # batch and token count stay free


@pytest.mark.parametrize("how", ["reshape", "torch.reshape", "unflatten"])
def test_a_size_read_from_a_pruned_tensor_folds_an_unpruned_one(how):
    """`b` is folded back with the width read from `a`, whose channels are pruned while b's are not: the size
    given to b's (unchanged) dim stays b's width, in reshape, torch.reshape and unflatten alike."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.oa, self.ob = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            n, t, d = a.shape
            if how == "unflatten":
                c = b.flatten(1).unflatten(1, (t, d))
            elif how == "torch.reshape":
                c = torch.reshape(b, (n, t, d))
            else:
                c = b.reshape(n, t, d)
            return self.oa(a) + self.ob(c)

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(2, 5, 4)
    with torch.no_grad():  # channels 3..7 of a carry nothing: removing them is exact
        model.a.weight[3:] = 0
        model.a.bias[3:] = 0
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    new = remove_channels(gm, dg.group_of("a", dim=2), list(range(3)))
    assert new.a.out_features == 3 and new.b.out_features == 8
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)
    assert new(torch.randn(3, 7, 4)).shape == (3, 7, 2)


def _without_dead_residual_half(model: nn.Module, x: torch.Tensor, writers: tuple[str, ...]) -> nn.Module:
    """Zero channels 8..15 of the 16-wide residual stream in every layer that writes it (so they carry nothing
    and removing them is exact), then remove them: the group of `inp`'s output (dim 2)."""
    with torch.no_grad():
        for name in writers:
            layer = model.get_submodule(name)
            layer.weight[8:] = 0
            layer.bias[8:] = 0
    gm = fxslim.trace(model)
    dg = fxslim.analyze(gm, (x,))
    return remove_channels(gm, dg.group_of("inp", dim=2), list(range(8)))
