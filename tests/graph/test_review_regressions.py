"""Regression tests for defects found in review: each would have produced a wrong model or a bare error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.errors import PassError
from fxslim.rewrite import ChannelPlan, apply_plan, remove_channels


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
    assert dg.group_of("a", 2) is not None


def test_hooks_on_the_result_do_not_fire_on_the_input_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    res = fxslim.compress(model, (torch.randn(1, 3, 2, 2),), ["prune_channels"])
    calls = []
    res.module.get_submodule("1").register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 3, 2, 2))
    assert calls == []


def test_prelu_slope_is_not_a_norm_scale():
    from fxslim.importance import atom_scores

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 2, 1))
    dg = fxslim.analyze(model, (torch.randn(1, 3, 2, 2),))
    g = dg.group_of("_0")
    assert list(atom_scores(dg, "bn_scale")[g.atoms]) == list(atom_scores(dg, "l1")[g.atoms])


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
    with pytest.raises(PassError, match="reshape"):
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
