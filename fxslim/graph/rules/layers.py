"""Channel rules of layers that own parameters: conv, transposed conv, linear, the norms, PReLU, embedding,
and ChannelAffine. Each ties its parameter dims to the channel ids (`deps.param`) and
its update sets the module's size attributes from the re-indexed parameters."""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from fxslim.graph.rules.base import CHANNEL, FIXED, SLICE, DepsBuilder, Ids, PlanApplier, call_arg, norm_dim


def conv(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    shape = deps.shape(node)
    nd = mod.weight.dim() - 2
    if x is None or shape is None or len(x) != nd + 2:
        return None
    g = mod.groups
    w = deps.param(node, "weight", [CHANNEL, SLICE if g == 1 else None] + [None] * nd, ["out", "in"])
    if mod.bias is not None:
        deps.param(node, "bias", [CHANNEL], ["out"], like=[w[0]])
    cout = w[0]
    if g == 1:
        deps.unify(x[1], w[1])
    else:  # grouped / depthwise: a whole group (its inputs and outputs) is one channel
        ins, outs = x[1].reshape(g, -1), cout.reshape(g, -1)
        deps.unify(outs, np.broadcast_to(outs[:, :1], outs.shape))
        deps.unify(ins, np.broadcast_to(outs[:, :1], ins.shape))
    return [x[0], cout] + [deps.fresh_dim(s, FIXED) for s in shape[2:]]


def conv_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    out_c = mod.weight.shape[0]
    if mod.groups > 1:
        mod.groups = mod.groups * out_c // mod.out_channels
    mod.out_channels = out_c
    mod.in_channels = mod.weight.shape[1] * mod.groups


def conv_transpose(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    shape = deps.shape(node)
    nd = mod.weight.dim() - 2
    if x is None or shape is None or len(x) != nd + 2 or mod.groups != 1:
        return None
    w = deps.param(node, "weight", [SLICE, CHANNEL] + [None] * nd, ["in", "out"])
    if mod.bias is not None:
        deps.param(node, "bias", [CHANNEL], ["out"], like=[w[1]])
    deps.unify(x[1], w[0])
    return [x[0], w[1]] + [deps.fresh_dim(s, FIXED) for s in shape[2:]]


def conv_transpose_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    mod.in_channels, mod.out_channels = mod.weight.shape[0], mod.weight.shape[1]


def linear(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None:
        return None
    w = deps.param(node, "weight", [CHANNEL, SLICE], ["out", "in"])
    if mod.bias is not None:
        deps.param(node, "bias", [CHANNEL], ["out"], like=[w[0]])
    deps.unify(x[-1], w[1])
    return list(x[:-1]) + [w[0]]


def linear_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def batchnorm(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None or len(x) < 2:
        return None
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(mod, name, None) is not None:
            deps.param(node, name, [SLICE], ["norm"], like=[x[1]])
    return list(x)


def batchnorm_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    mod.num_features = applier.new_shapes(node)[1]


def groupnorm(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None or len(x) < 2:
        return None
    per = x[1].reshape(mod.num_groups, -1)  # statistics are per group: a group is one channel
    deps.unify(per, np.broadcast_to(per[:, :1], per.shape))
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            deps.param(node, name, [SLICE], ["norm"], like=[x[1]])
    return list(x)


def groupnorm_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    c = applier.new_shapes(node)[1]
    mod.num_groups = mod.num_groups * c // mod.num_channels
    mod.num_channels = c


def layernorm(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None:
        return None
    k = len(mod.normalized_shape)
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            deps.param(node, name, [SLICE] * k, ["norm"] * k, like=list(x[-k:]))
    return list(x)


def layernorm_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    k = len(mod.normalized_shape)
    mod.normalized_shape = tuple(applier.new_shapes(node)[-k:])


def layernorm_fn(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """F.layer_norm(x, normalized_shape, weight, bias, eps) with weights from get_attr nodes."""
    x = deps.ids(node.args[0])
    if x is None:
        return None
    k = len(call_arg(node, 1, "normalized_shape"))
    for i, name in ((2, "weight"), (3, "bias")):
        p = call_arg(node, i, name)
        if isinstance(p, fx.Node):
            ids = deps.ids(p)
            if ids is None or len(ids) != k:
                return None
            for d in range(k):
                deps.unify(x[len(x) - k + d], ids[d])
    return list(x)


def layernorm_fn_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    k = len(call_arg(node, 1, "normalized_shape"))
    shape = tuple(applier.new_shapes(node)[-k:])
    if len(node.args) > 1:
        node.args = (node.args[0], shape, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": shape}


def prelu(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None:
        return None
    if mod.num_parameters > 1:
        deps.param(node, "weight", [SLICE], ["param"], like=[x[1]])
    return list(x)


def prelu_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    mod.num_parameters = mod.weight.shape[0]


def embedding(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None:
        return None
    w = deps.param(node, "weight", [None, CHANNEL], [None, "out"])
    return list(x) + [w[1]]


def embedding_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    mod.embedding_dim = mod.weight.shape[1]


def channel_affine(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    """ChannelAffine: channels pass; its scale and shift buffers are sliced with the channel dim."""
    x = deps.ids(node.args[0])
    if x is None:
        return None
    d = norm_dim(mod.dim, len(x))
    for attr in ("scale", "shift"):
        deps.param(node, attr, [SLICE], ["param"], like=[x[d]])
    return list(x)
