"""Swin window attention: fxslim's `slim_window_attention` computes torchvision's `shifted_window_attention`
(v1 and v2, shifted windows, padding); the analyzer makes a head one channel (q/k/v rows, proj columns,
position-bias column or cpb-MLP unit, logit_scale entry) and the residual width an ordinary dim; the
rewrite turns the call into `slim_window_attention` with the new head count. Before → pass → After."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer as swin

import fxslim
from fxslim.modules import slim_window_attention
from fxslim.rewrite import remove_channels

# ---------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("hw", [(14, 14), (9, 13), (5, 11)], ids=["divisible", "padded", "one-window-high"])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3], [0, 3]], ids=["plain", "shifted", "shift-w-only"])
def test_slim_window_attention_equals_torchvision(v2, hw, shift):
    torch.manual_seed(0)
    c, heads, window = 24, 3, [7, 7]
    x = torch.randn(2, *hw, c)
    qkv_w, proj_w, qkv_b, proj_b = torch.randn(3 * c, c), torch.randn(c, c), torch.randn(3 * c), torch.randn(c)
    bias = torch.randn(1, heads, 49, 49)
    scale = torch.rand(heads, 1, 1) * 5 if v2 else None
    args = dict(shift_size=shift, qkv_bias=qkv_b, proj_bias=proj_b, logit_scale=scale, training=False)
    want = swin.shifted_window_attention(x, qkv_w, proj_w, bias, window, heads, **args)
    got = slim_window_attention(x, qkv_w, proj_w, bias, window, heads, c // heads, **args)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_slim_window_attention_widths_are_independent_of_the_input_width():
    """heads·head_dim (2·5 = 10) differs from the input width (24) and from the output width (16)."""
    x = torch.randn(1, 9, 9, 24)
    y = slim_window_attention(x, torch.randn(30, 24), torch.randn(16, 10), torch.randn(1, 2, 16, 16), [4, 4], 2, 5,
                              shift_size=[2, 2], training=False)
    assert y.shape == (1, 9, 9, 16)


# ---------------------------------------------------------------------------------------------- a small Swin


class TinySwin(nn.Module):
    """Patch embedding, a plain and a shifted torchvision Swin block, pooled head: 12x12 tokens, window 4."""

    def __init__(self, v2: bool, dim: int = 24, heads: int = 3):
        super().__init__()
        block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
        attn = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(
            *(block(dim, heads, [4, 4], shift, mlp_ratio=2.0, attn_layer=attn) for shift in ([0, 0], [2, 2]))
        )
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))


def _tiny(v2: bool) -> TinySwin:
    """Random, non-trivial position biases and logit scales: a head whose bias or scale follows the wrong
    head changes the output well above 1e-5."""
    torch.manual_seed(1)
    model = TinySwin(v2).eval()
    for block in model.blocks:
        if v2:
            block.attn.logit_scale.data = torch.log(torch.tensor([2.0, 6.0, 15.0])).view(3, 1, 1)
            nn.init.normal_(block.attn.cpb_mlp[2].weight, std=0.5)
        else:
            nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    return model


def _call(gm, name: str = "shifted_window_attention"):
    return next(n for n in gm.graph.nodes if n.name == name)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_heads_are_atoms_with_their_bias_and_scale(v2):
    model = _tiny(v2)
    dg = fxslim.analyze(model, (torch.randn(1, 3, 24, 24),))
    heads = dg.group_of("blocks_0_attn_qkv_weight", 0)
    members = {m.node for m in heads.members}
    assert heads.size == 3 and heads.prunable
    assert {"blocks_0_attn_qkv_weight", "blocks_0_attn_proj_weight", "blocks_0_attn_qkv_bias"} <= members
    if v2:
        assert {"blocks.0.attn.cpb_mlp.2.weight", "blocks_0_attn_logit_scale"} <= members
    else:
        assert "blocks_0_attn_relative_position_bias_table" in members
    stream = dg.group_of("embed", 1)
    assert stream.size == 24 and stream.prunable  # the residual width: qkv columns, proj rows, norms, MLP
    assert dg.group_of("blocks_0_attn_qkv_weight", 1) is stream
    assert dg.group_of("blocks_1_attn_proj_weight", 0) is stream
    assert not any("C // num_heads" in (g.reason or "") for g in dg.groups)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_removing_a_silent_head_keeps_the_output(v2):
    """Head 1 of block 0 contributes nothing (its proj columns are zero): removing it whole must leave the
    output unchanged; removing misaligned rows, bias columns or scales would not."""
    model = _tiny(v2)
    model.blocks[0].attn.proj.weight.data[:, 8:16] = 0
    x = torch.randn(2, 3, 24, 24)
    dg = fxslim.analyze(model, (x,))
    pruned = remove_channels(dg.gm, dg.group_of("blocks_0_attn_qkv_weight", 0), [0, 2])
    call = _call(pruned)
    assert call.target is slim_window_attention
    assert call.args[5:7] == (2, 8)  # num_heads, head_dim
    assert pruned.get_parameter("blocks.0.attn.qkv.weight").shape == (48, 24)
    assert pruned.get_parameter("blocks.0.attn.proj.weight").shape == (24, 16)
    if v2:
        assert pruned.get_parameter("blocks.0.attn.logit_scale").shape == (2, 1, 1)
        assert pruned.get_parameter("blocks.0.attn.cpb_mlp.2.weight").shape == (2, 512)
    else:
        assert pruned.get_parameter("blocks.0.attn.relative_position_bias_table").shape == (49, 2)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5, rtol=0)


def test_pruning_twice_prunes_the_rewritten_call_again():
    """After one round the call is fxslim's op; its own rule prunes it again (3 -> 2 -> 1 heads)."""
    x = torch.randn(1, 3, 24, 24)
    step = {"pass": "prune_channels", "ratio": 0.5}
    res = fxslim.compress(_tiny(False), (x,), [step, step])
    call = _call(res.module)
    assert call.target is slim_window_attention and call.args[5:7] == (1, 8)
    assert res.module(x).shape == (1, 5)


class OddBias(nn.Module):
    """torchvision's window attention with a per-window position bias [windows, heads, N, N] between two
    linear layers: it runs (no shift, 4 windows) but is not the layout the rule knows."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.proj, self.out = nn.Linear(3, 8), nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 2)
        self.bias = nn.Parameter(torch.randn(4, 2, 16, 16))

    def forward(self, x):
        y = swin.shifted_window_attention(self.embed(x), self.qkv.weight, self.proj.weight, self.bias, [4, 4], 2,
                                          [0, 0], qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=False)
        return self.out(y)


def test_unknown_bias_layout_is_frozen_with_the_reason():
    dg = fxslim.analyze(OddBias(), (torch.randn(1, 8, 8, 3),))
    assert dg.unsupported == []  # a declared rule that refuses this layout, not a missing rule
    assert dg.prunable_groups == []
    reason = dg.group_of("embed", 3).reason
    assert "relative_position_bias has shape (4, 2, 16, 16)" in reason and "shifted_window_attention" in reason


# ---------------------------------------------------------------------------------------------- torchvision


SWINS = {
    # name: (input size, heads per block before, after pruning half)
    "swin_t": (64, [3, 3, 6, 6] + [12] * 6 + [24, 24], [2, 2, 3, 3] + [6] * 6 + [12, 12]),
    "swin_v2_t": (64, [3, 3, 6, 6] + [12] * 6 + [24, 24], [2, 2, 3, 3] + [6] * 6 + [12, 12]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWINS))
def test_torchvision_swin_prunes_heads_and_widths_with_onnx_parity(name, tmp_path):
    size, heads_before, heads_after = SWINS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    dg = fxslim.analyze(model, (x,))
    assert dg.unsupported == []
    assert [g.size for g in dg.groups if not g.prunable] == [1000]  # only the classifier's outputs
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
    calls = [n for n in res.module.graph.nodes if n.name.startswith("shifted_window_attention")]
    assert all(n.target is slim_window_attention for n in calls)
    assert [n.args[5] for n in calls] == heads_after and all(n.args[6] == 32 for n in calls)
    for n, before in zip(calls, heads_before, strict=True):
        qkv = res.module.get_parameter(n.args[1].target)
        assert qkv.shape[0] == 3 * n.args[5] * n.args[6] < 3 * 32 * before  # heads·head_dim shrank
    assert res.module.get_parameter("features.1.0.attn.qkv.weight").shape[1] == 48  # residual width 96 -> 48
    assert res.module.get_parameter("features.2.reduction.weight").shape == (96, 4 * 48)  # 2x2 merge: 4 copies
    with torch.no_grad():
        out = res.module(x)
    assert out.shape == model(x).shape == (1, 1000)
    r = res.report[0]
    assert r.params_after < 0.3 * r.params_before
    assert fxslim.export_onnx(res.module, (x,), tmp_path / f"{name}.onnx") < 1e-4 * max(1.0, out.abs().max().item())
