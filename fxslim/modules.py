"""Modules that rewrites put into a graph when a torch module cannot express the pruned layer.

`SlimMultiheadAttention` computes exactly what `nn.MultiheadAttention` computes (packed q/k/v projection,
scaled dot-product attention per head, output projection) but lets the input width, the number of heads
and the output width differ, which `nn.MultiheadAttention` cannot (it ties all three to `embed_dim`). It
keeps the same parameter names and call signature, so the analyzer's attention rule reads both. Attention
weights are not returned (the analyzer freezes an attention whose weights are used).
`slim_window_attention` is the same for torchvision's Swin `shifted_window_attention` (v1 and v2): it takes
`num_heads` and `head_dim` explicitly, so the attention width heads·head_dim no longer has to equal the
residual width. Nothing here decides what to prune."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SlimMultiheadAttention(nn.Module):
    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = num_heads, head_dim, batch_first, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_module(cls, mha: nn.Module) -> SlimMultiheadAttention:
        """Wrap the (already re-indexed) parameters of an nn.MultiheadAttention or a SlimMultiheadAttention."""
        heads = mha.num_heads
        head_dim = mha.in_proj_weight.shape[0] // 3 // heads
        new = cls(mha.in_proj_weight.shape[1], heads, head_dim, mha.out_proj.weight.shape[0],
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, dropout=mha.dropout)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new.train(mha.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:inner], b[inner : 2 * inner], b[2 * inner :])
        q = self._heads(F.linear(query, w[:inner], bq))
        k = self._heads(F.linear(key, w[inner : 2 * inner], bk))
        v = self._heads(F.linear(value, w[2 * inner :], bv))
        mask = _attention_mask(attn_mask, key_padding_mask, n, self.num_heads, q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal and mask is None)
        y = self.out_proj(y.transpose(1, 2).reshape(n, length, inner))
        return (y if self.batch_first else y.transpose(0, 1)), None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)


def _attention_mask(attn_mask, key_padding_mask, n: int, heads: int, dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True = masked out, or additive floats) as one additive mask."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:  # (N*heads, L, S)
            mask = mask.view(n, heads, mask.shape[-2], mask.shape[-1])
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, dtype).view(n, 1, 1, key_padding_mask.shape[-1])
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class ChannelAffine(nn.Module):
    """`y = scale · x + shift` per channel along `dim` (buffers, not trained): a per-channel correction kept
    as an op of its own instead of folded into the neighbouring layer (e.g. `asr` with fold=False)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None = None, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", torch.zeros_like(self.scale) if shift is None else shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, dim={self.dim}"



def slim_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    head_dim: int,
    shift_size: list[int] = (0, 0),
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Shifted-window multi-head self-attention, x [B, H, W, C] -> [B, H, W, proj rows], computing what
    torchvision's `shifted_window_attention` computes (Swin, Liu et al. 2021, Eq. 4: softmax(QKᵀ/√d + B)V;
    with `logit_scale`, Swin V2, Liu et al. 2022, Eq. 2: cosine attention cos(q, k)·τ + B) with the
    attention width `num_heads * head_dim` independent of C: qkv_weight is [3·heads·head_dim, C],
    proj_weight [C_out, heads·head_dim]."""
    b, h, w, _ = input.shape
    x, pad_h, pad_w = _pad_to_windows(input, window_size)
    shift = _effective_shift(window_size, shift_size, pad_h, pad_w)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = _partition(x, window_size)  # [B·nW, N, C]
    q, k, v = _window_qkv(windows, qkv_weight, qkv_bias, num_heads, head_dim, logit_scale is not None)
    attn = _window_logits(q, k, head_dim, logit_scale) + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, attn.dtype, attn.device)  # [nW, N, N]
        n_win, n = mask.shape[0], attn.shape[-1]
        attn = (attn.view(-1, n_win, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    y = attn.matmul(v).transpose(1, 2).reshape(windows.shape[0], windows.shape[1], num_heads * head_dim)
    y = F.dropout(F.linear(y, proj_weight, proj_bias), p=dropout, training=training)
    y = _merge_windows(y, b, pad_h, pad_w, window_size)
    if sum(shift) > 0:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :h, :w, :].contiguous()


torch.fx.wrap("slim_window_attention")


def _pad_to_windows(x: torch.Tensor, window_size: list[int]) -> tuple[torch.Tensor, int, int]:
    """Zero-pad H and W (bottom, right) up to multiples of the window."""
    _, h, w, _ = x.shape
    pad_b, pad_r = (-h) % window_size[0], (-w) % window_size[1]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    return x, h + pad_b, w + pad_r


def _effective_shift(window_size: list[int], shift_size: list[int], pad_h: int, pad_w: int) -> list[int]:
    """No shift along a dim that one window already covers."""
    return [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]


def _partition(x: torch.Tensor, window_size: list[int]) -> torch.Tensor:
    """[B, pH, pW, C] -> [B·nW, wh·ww, C], windows in row-major order."""
    b, ph, pw, c = x.shape
    wh, ww = window_size
    x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (ph // wh) * (pw // ww), wh * ww, c)


def _merge_windows(y: torch.Tensor, b: int, pad_h: int, pad_w: int, window_size: list[int]) -> torch.Tensor:
    """[B·nW, wh·ww, C] -> [B, pH, pW, C] (inverse of `_partition`)."""
    wh, ww = window_size
    c = y.shape[-1]
    y = y.view(b, pad_h // wh, pad_w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(b, pad_h, pad_w, c)


def _window_qkv(windows, qkv_weight, qkv_bias, num_heads: int, head_dim: int, cosine: bool):
    """q, k, v as [B·nW, heads, N, head_dim]; Swin V2 has no key bias (its middle third is zeroed)."""
    if cosine and qkv_bias is not None:
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third : 2 * third]), qkv_bias[2 * third :]])
    qkv = F.linear(windows, qkv_weight, qkv_bias)
    qkv = qkv.reshape(windows.shape[0], windows.shape[1], 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _window_logits(q, k, head_dim: int, logit_scale: torch.Tensor | None) -> torch.Tensor:
    """Attention logits per head: scaled dot product (v1) or cosine similarity times a clamped per-head τ (v2)."""
    if logit_scale is None:
        return (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    return attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()


def _shift_mask(pad_h: int, pad_w: int, window_size: list[int], shift: list[int], dtype, device) -> torch.Tensor:
    """[nW, N, N] additive mask: -100 between tokens of a window that came from different regions of the
    cyclically shifted map (three bands per shifted dim: [0, p-w), [p-w, p-s), [p-s, p)), else 0."""
    rows = _shift_bands(pad_h, window_size[0], shift[0], device)
    cols = _shift_bands(pad_w, window_size[1], shift[1], device)
    region = (rows[:, None] * 3 + cols[None, :]).to(dtype)
    region = _partition(region[None, :, :, None], window_size)[..., 0]  # [nW, N]
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _shift_bands(size: int, window: int, shift: int, device) -> torch.Tensor:
    """Region label of each position along one padded dim (one band when that dim is not shifted)."""
    pos = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(pos)
    return (pos >= size - window).long() + (pos >= size - shift).long()
