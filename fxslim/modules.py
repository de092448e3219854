"""Modules that rewrites put into a graph when a torch module cannot express the pruned layer.

`SlimMultiheadAttention` computes exactly what `nn.MultiheadAttention` computes (packed q/k/v projection,
scaled dot-product attention per head, output projection) but lets the input width, the number of heads
and the output width differ, which `nn.MultiheadAttention` cannot (it ties all three to `embed_dim`). It
keeps the same parameter names and call signature, so the analyzer's attention rule reads both. Attention
weights are not returned (the analyzer freezes an attention whose weights are used). Nothing here decides
what to prune."""

from __future__ import annotations

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

