"""THE table: module type, function or method name -> `Rule`, and `rule_for`, the one lookup the analyzer and
the rewriter use. The rule functions live in their family files; this file only pairs them with ops.
Adding an op is adding a row; ops from outside fxslim's core (adapters, users' layers) add theirs with
`fxslim.register_op` (fxslim/ops.py)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.rules.attention import (
    multihead_attention,
    multihead_attention_update,
    patch_merging_pad,
    relative_position_bias,
    sdpa,
    window_attention,
    window_attention_update,
)
from fxslim.graph.rules.base import CoupleFn, UpdateFn
from fxslim.graph.rules.contraction import einsum, matmul
from fxslim.graph.rules.elementwise_reduce import elementwise, no_tensor, passthrough, reduce_dims, spatial
from fxslim.graph.rules.layers import (
    batchnorm,
    batchnorm_update,
    channel_affine,
    conv,
    conv_transpose,
    conv_transpose_update,
    conv_update,
    embedding,
    embedding_update,
    groupnorm,
    groupnorm_update,
    layernorm,
    layernorm_fn,
    layernorm_fn_update,
    layernorm_update,
    linear,
    linear_update,
    prelu,
    prelu_update,
)
from fxslim.graph.rules.shape_ops import (
    concat,
    expand,
    expand_update,
    getitem,
    getitem_update,
    permute,
    reshape,
    reshape_update,
    split,
    split_update,
    stack,
)
from fxslim.modules import ChannelAffine, SlimMultiheadAttention, slim_window_attention


@dataclass(frozen=True)
class Rule:
    """One op's row. `couple(deps, node, mod)` ties the op's channel indices while the graph is analysed;
    `update(applier, node, mod)`, when there is one, fixes module attributes and node arguments once a plan
    changed channels. `rewrites_size_args`: the update rewrites size arguments (view/reshape/expand sizes),
    so it must also run when only a size the node reads changed, not the node's own channels."""

    couple: CoupleFn
    update: UpdateFn | None = None
    rewrites_size_args: bool = False


_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Hardtanh,
    nn.Tanhshrink,
)
_POOLS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.Upsample: None,
    nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2,
}


MODULE_RULES: dict[type, Rule] = {
    nn.Conv1d: Rule(conv, conv_update),
    nn.Conv2d: Rule(conv, conv_update),
    nn.Conv3d: Rule(conv, conv_update),
    nn.ConvTranspose1d: Rule(conv_transpose, conv_transpose_update),
    nn.ConvTranspose2d: Rule(conv_transpose, conv_transpose_update),
    nn.Linear: Rule(linear, linear_update),
    nn.BatchNorm1d: Rule(batchnorm, batchnorm_update),
    nn.BatchNorm2d: Rule(batchnorm, batchnorm_update),
    nn.BatchNorm3d: Rule(batchnorm, batchnorm_update),
    nn.InstanceNorm1d: Rule(batchnorm, batchnorm_update),
    nn.InstanceNorm2d: Rule(batchnorm, batchnorm_update),
    nn.GroupNorm: Rule(groupnorm, groupnorm_update),
    nn.LayerNorm: Rule(layernorm, layernorm_update),
    nn.PReLU: Rule(prelu, prelu_update),
    nn.Embedding: Rule(embedding, embedding_update),
    nn.Flatten: Rule(reshape),
    nn.Unflatten: Rule(reshape, reshape_update, rewrites_size_args=True),
    nn.MultiheadAttention: Rule(multihead_attention, multihead_attention_update),
    SlimMultiheadAttention: Rule(multihead_attention, multihead_attention_update),
    ChannelAffine: Rule(channel_affine),
    **{t: Rule(passthrough) for t in _ACTIVATIONS},
    **{t: Rule(spatial(n)) for t, n in _POOLS.items()},
}


_ELEMENTWISE_FNS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    operator.isub,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.neg,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.sqrt,
    torch.rsqrt,
    torch.clamp,
    torch.where,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.tanh,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    F.hardtanh,
)
_POOL_FNS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.interpolate: None,
    torch.max_pool2d: 2,
    torch.avg_pool1d: 1,
}


FUNCTION_RULES: dict[object, Rule] = {
    **{f: Rule(elementwise) for f in _ELEMENTWISE_FNS},
    **{f: Rule(spatial(n)) for f, n in _POOL_FNS.items()},
    torch.cat: Rule(concat),
    torch.concat: Rule(concat),
    torch.stack: Rule(stack),
    torch.flatten: Rule(reshape),
    torch.reshape: Rule(reshape, reshape_update, rewrites_size_args=True),
    torch.squeeze: Rule(reshape),
    torch.unsqueeze: Rule(reshape),
    torch.transpose: Rule(permute),
    torch.swapaxes: Rule(permute),
    torch.swapdims: Rule(permute),
    torch.permute: Rule(permute),
    torch.einsum: Rule(einsum),
    torch.split: Rule(split, split_update),
    torch.chunk: Rule(split, split_update),
    operator.getitem: Rule(getitem, getitem_update),
    torch.mean: Rule(reduce_dims),
    torch.sum: Rule(reduce_dims),
    torch.amax: Rule(reduce_dims),
    torch.amin: Rule(reduce_dims),
    torch.matmul: Rule(matmul),
    operator.matmul: Rule(matmul),
    torch.bmm: Rule(matmul),
    F.scaled_dot_product_attention: Rule(sdpa),
    slim_window_attention: Rule(window_attention, window_attention_update),
    F.layer_norm: Rule(layernorm_fn, layernorm_fn_update),
    getattr: Rule(no_tensor),
    operator.floordiv: Rule(no_tensor),
}


METHOD_RULES: dict[str, Rule] = {
    **{
        m: Rule(elementwise)
        for m in (
            "add",
            "sub",
            "mul",
            "div",
            "add_",
            "mul_",
            "sub_",
            "div_",
            "clamp",
            "maximum",
            "minimum",
            "where",
            "masked_fill",
        )
    },
    **{
        m: Rule(passthrough)
        for m in (
            "relu",
            "relu_",
            "sigmoid",
            "sigmoid_",
            "tanh",
            "contiguous",
            "clone",
            "float",
            "to",
            "type_as",
            "detach",
            "softmax",
            "log_softmax",
            "exp",
            "abs",
            "neg",
            "sqrt",
            "gelu",
            "hardtanh",
            "clamp_",
        )
    },
    **{m: Rule(reduce_dims) for m in ("mean", "sum", "amax", "amin")},
    "view": Rule(reshape, reshape_update, rewrites_size_args=True),
    "reshape": Rule(reshape, reshape_update, rewrites_size_args=True),
    "flatten": Rule(reshape),
    "unflatten": Rule(reshape, reshape_update, rewrites_size_args=True),
    "squeeze": Rule(reshape),
    "unsqueeze": Rule(reshape),
    "permute": Rule(permute),
    "transpose": Rule(permute),
    "swapaxes": Rule(permute),
    "swapdims": Rule(permute),
    "chunk": Rule(split, split_update),
    "split": Rule(split, split_update),
    "expand": Rule(expand, expand_update, rewrites_size_args=True),
    "size": Rule(no_tensor),
    "dim": Rule(no_tensor),
    "matmul": Rule(matmul),
    "bmm": Rule(matmul),
}


def _register_torchvision() -> None:
    """torchvision wraps some ops with torch.fx.wrap; they appear as calls and need rows here."""
    try:
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency, but the table must not need it
        return
    FUNCTION_RULES[stochastic_depth] = Rule(passthrough)
    from torchvision.models import swin_transformer as swin

    FUNCTION_RULES[swin.shifted_window_attention] = Rule(window_attention, window_attention_update)
    FUNCTION_RULES[swin._get_relative_position_bias] = Rule(relative_position_bias)
    FUNCTION_RULES[swin._patch_merging_pad] = Rule(patch_merging_pad)


_register_torchvision()


def rule_for(node: fx.Node, gm: fx.GraphModule) -> tuple[Rule | None, nn.Module | None]:
    """The rule of the op a node calls, and the module it calls (None for functions and methods)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for t in type(mod).__mro__:
            # A subclass inherits its parent's rule only when it keeps the parent's forward.
            if t in MODULE_RULES and type(mod).forward is t.forward:
                return MODULE_RULES[t], mod
        return None, mod
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target), None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target), None
    return None, None
