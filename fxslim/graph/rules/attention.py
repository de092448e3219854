"""Channel rules of attention: scaled_dot_product_attention, nn.MultiheadAttention (a head is one channel;
a change swaps in SlimMultiheadAttention) and Swin window attention (torchvision's, or fxslim's
`slim_window_attention`, which a change swaps in), with the Swin helpers torchvision wraps for fx."""

from __future__ import annotations

import inspect
import operator

import numpy as np
from torch import fx, nn

from fxslim.graph.rules.base import CHANNEL, FIXED, SLICE, DepsBuilder, Ids, PlanApplier, call_arg
from fxslim.graph.rules.contraction import broadcast_dims
from fxslim.modules import SlimMultiheadAttention, slim_window_attention


def sdpa(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    q, k, v = (deps.ids(call_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
    shape = deps.shape(node)
    if q is None or k is None or v is None or shape is None:
        return None
    mask = call_arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        deps.freeze_value(mask, f"{node.name}: attention mask")
    deps.unify(q[-1], k[-1])
    deps.unify(k[-2], v[-2])
    batch = broadcast_dims(deps, q[:-2], k[:-2], shape[:-2])
    broadcast_dims(deps, batch, v[:-2], shape[:-2])
    return batch + [q[-2], v[-1]]


def _attention_inputs(node: fx.Node) -> list:
    return [call_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]


def _freeze_attention(deps: DepsBuilder, node: fx.Node, reason: str) -> tuple:
    q = deps.ids(call_arg(node, 0, "query"))
    for a in node.all_input_nodes:
        ids = deps.ids(a)
        if ids is not None:
            deps.freeze(ids[-1], f"{node.name}: {reason}")
    shapes = deps.shapes(node)
    out = list(q[:-1]) + [deps.fresh_dim(len(q[-1]), FIXED)]
    weights = None if shapes is None or shapes[1] is None else [deps.fresh_dim(s, FIXED) for s in shapes[1]]
    return (out, weights)


def multihead_attention(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> tuple | None:
    """nn.MultiheadAttention (packed q/k/v): a head is one channel of the q, k and v rows; input columns
    follow the query/key/value inputs; the output projection's rows are a new channel space. Any change
    turns the module into a SlimMultiheadAttention (see update). Frozen when the attention weights are used,
    when k/v have their own widths, or with bias_k / add_zero_attn."""
    q, k, v = (deps.ids(a) for a in _attention_inputs(node))
    if q is None or k is None or v is None:
        return None
    weights_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    if (
        getattr(mod, "in_proj_weight", None) is None
        or getattr(mod, "bias_k", None) is not None
        or getattr(mod, "add_zero_attn", False)
        or weights_used
    ):
        return _freeze_attention(deps, node, "attention with separate k/v widths, bias_k or used weights")
    heads = mod.num_heads
    head_dim = mod.in_proj_weight.shape[0] // 3 // heads
    per_head = np.repeat(deps.fresh_dim(heads, CHANNEL), head_dim)
    w = deps.param(node, "in_proj_weight", [None, SLICE], ["out", "in"], like=[np.tile(per_head, 3), None])
    if mod.in_proj_bias is not None:
        deps.param(node, "in_proj_bias", [None], ["out"], like=[w[0]])
    for x in (q, k, v):
        deps.unify(x[-1], w[1])
    o = deps.param(node, "out_proj.weight", [CHANNEL, None], ["out", "in"], like=[None, w[0][: len(per_head)]])
    if mod.out_proj.bias is not None:
        deps.param(node, "out_proj.bias", [None], ["out"], like=[o[0]])
    return (list(q[:-1]) + [o[0]], None)  # the weights are unused (else frozen above); the rewrite drops them


def multihead_attention_update(applier: PlanApplier, node: fx.Node, mod: nn.Module) -> None:
    """Heads or widths changed: nn.MultiheadAttention cannot hold that, so the node's module becomes a
    SlimMultiheadAttention over the re-indexed parameters (whole heads go, so head_dim stays)."""
    mod.num_heads = mod.in_proj_weight.shape[0] // 3 // mod.head_dim
    parent, _, attr = str(node.target).rpartition(".")
    owner = applier.gm.get_submodule(parent) if parent else applier.gm
    setattr(owner, attr, SlimMultiheadAttention.from_module(mod))


def _call_args(node: fx.Node) -> dict | None:
    """The call's arguments by parameter name, defaults filled in (None when they do not bind)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _value_shape(deps: DepsBuilder, value: object) -> tuple | None:
    return deps.shape(value) if isinstance(value, fx.Node) else None


def _window_layout(deps: DepsBuilder, node: fx.Node, a: dict) -> tuple[int, int] | str:
    """(heads, head_dim) of a Swin window-attention call whose tensors have the layout the op computes
    with, else the reason why not. torchvision's function derives head_dim = C // num_heads from its input
    width C (so the attention and output widths must equal C); fxslim's takes head_dim explicitly."""
    heads = a["num_heads"]
    x, qkv, proj = (_value_shape(deps, a[k]) for k in ("input", "qkv_weight", "proj_weight"))
    if not isinstance(heads, int) or heads < 1 or x is None or qkv is None or proj is None or len(x) != 4:
        return "num_heads or the input/weight shapes are not static"
    c = x[-1]
    if node.target is slim_window_attention:
        head_dim = a["head_dim"]
        if not isinstance(head_dim, int):
            return "head_dim is not a constant"
    elif c % heads or proj != (c, c):
        return f"input width {c} is not num_heads·head_dim with a [C, C] projection ({heads} heads, proj {proj})"
    else:
        head_dim = c // heads
    inner = heads * head_dim
    if qkv != (3 * inner, c) or len(proj) != 2 or proj[1] != inner:
        return f"qkv {qkv} / proj {proj} do not match {heads} heads of {head_dim} on a width of {c}"
    for key, want in (("qkv_bias", (3 * inner,)), ("proj_bias", (proj[0],)), ("logit_scale", (heads, 1, 1))):
        if a[key] is not None and _value_shape(deps, a[key]) != want:
            return f"{key} has shape {_value_shape(deps, a[key])}, expected {want}"
    n = int(np.prod(a["window_size"]))
    bias = _value_shape(deps, a["relative_position_bias"])
    if bias is None or bias[:-3] not in ((), (1,)) or bias[-3:] not in ((heads, n, n), (1, n, n)):
        return f"relative_position_bias has shape {bias}, expected [1, {heads}, {n}, {n}]"
    return heads, head_dim


def window_attention(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """Swin shifted-window attention (torchvision's `shifted_window_attention`, fxslim's
    `slim_window_attention`): x [B, H, W, C] -> qkv linear -> heads -> proj linear -> [B, H, W, C_out].
    A head is one channel: its q, k and v rows of qkv_weight/qkv_bias, its columns of proj_weight, its
    column of the relative position bias (the table's column, or the cpb-MLP's output unit, upstream) and
    its logit_scale entry. The input width C is an ordinary dim (qkv columns); the output is a new channel
    space (proj rows). Any change turns the call into `slim_window_attention` (see update). A call whose
    shapes do not match that layout is frozen with the reason."""
    a = _call_args(node)
    if a is None or a.get("window_size") is None:
        return None
    x, qkv_w, proj_w = deps.ids(a["input"]), deps.ids(a["qkv_weight"]), deps.ids(a["proj_weight"])
    if x is None or qkv_w is None or proj_w is None or len(x) != 4 or len(qkv_w) != 2 or len(proj_w) != 2:
        return None
    layout = _window_layout(deps, node, a)
    if isinstance(layout, str):
        return _freeze_window_attention(deps, node, a, x, proj_w, layout)
    heads, head_dim = layout
    for d in range(3):
        deps.freeze(x[d], f"{node.name}: batch and window positions of Swin window attention")
    head = deps.fresh_dim(heads, CHANNEL)
    per_head = np.repeat(head, head_dim)
    deps.unify(qkv_w[0], np.tile(per_head, 3))
    deps.unify(qkv_w[1], x[-1])
    deps.unify(proj_w[1], per_head)
    deps.mark_summed(a["qkv_weight"], 1)
    deps.mark_summed(a["proj_weight"], 1)
    out = deps.fresh_dim(len(proj_w[0]), CHANNEL)
    deps.unify(out, proj_w[0])
    _tie_window_extras(deps, node, a, qkv_w[0], out, head)
    return list(x[:-1]) + [out]


def _tie_window_extras(deps: DepsBuilder, node: fx.Node, a: dict, qkv_rows, out, head) -> None:
    """Biases follow their weights' rows; the position bias's head dim and logit_scale's entries are heads."""
    for key, like in (("qkv_bias", qkv_rows), ("proj_bias", out)):
        if a[key] is not None:
            deps.unify(deps.ids(a[key])[0], like)
    bias = deps.ids(a["relative_position_bias"])
    for ids in bias[-2:]:
        deps.freeze(ids, f"{node.name}: window positions of the relative position bias")
    if len(bias[-3]) == len(head):
        deps.unify(bias[-3], head)
    if a["logit_scale"] is not None:
        deps.unify(deps.ids(a["logit_scale"])[0], head)


def _freeze_window_attention(deps: DepsBuilder, node: fx.Node, a: dict, x: Ids, proj_w: Ids, reason: str) -> Ids:
    why = f"{node.name}: Swin window attention: {reason}"
    for key in ("input", "qkv_weight", "proj_weight", "relative_position_bias", "qkv_bias", "proj_bias", "logit_scale"):
        if isinstance(a[key], fx.Node):
            deps.freeze_value(a[key], why)
    return list(x[:-1]) + [proj_w[0]]


def window_attention_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Heads or widths changed: the call becomes `slim_window_attention` with the new head count (whole heads
    go, so head_dim stays; torchvision's function would split heads by the new input width instead)."""
    a = _call_args(node)
    rows = len(applier.ids(a["qkv_weight"])[0])
    head_dim = a["head_dim"] if node.target is slim_window_attention else rows // 3 // a["num_heads"]
    heads = applier.new_shapes(a["qkv_weight"])[0] // 3 // head_dim
    node.target = slim_window_attention
    fixed = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size")
    node.args = (*(a[k] for k in fixed), heads, head_dim)
    node.kwargs = {k: v for k, v in a.items() if k not in (*fixed, "num_heads", "head_dim")}


def relative_position_bias(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """Swin `_get_relative_position_bias(table [(2w-1)^2, heads], index, window)` -> [1, heads, N, N]: the
    heads dim is the table's columns; the window dims are fixed (the table's rows are picked by the index)."""
    table, shape = deps.ids(node.args[0]), deps.shape(node)
    if table is None or shape is None or len(table) != 2 or len(shape) != 4:
        return None
    deps.freeze(table[0], f"{node.name}: relative position rows picked by an index tensor")
    return [deps.fresh_dim(shape[0], FIXED), table[1], deps.fresh_dim(shape[2], FIXED), deps.fresh_dim(shape[3], FIXED)]


def patch_merging_pad(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """Swin `_patch_merging_pad(x [..., H, W, C])` pads H and W to even sizes and (torchvision >= 0.20)
    concatenates the four 2x2 phases on the channel dim: output channels are C, k times over (k = 1 or 4),
    the spatial dims new. Sizes come from the input inside the function, so nothing needs an update."""
    x, shape = deps.ids(node.args[0]), deps.shape(node)
    if x is None or shape is None or len(x) < 3 or shape[-1] % len(x[-1]):
        return None
    channels = np.tile(x[-1], shape[-1] // len(x[-1]))
    return list(x[:-3]) + [deps.fresh_dim(shape[-3], FIXED), deps.fresh_dim(shape[-2], FIXED), channels]
