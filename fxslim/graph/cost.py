"""Parameter and MAC counting per node, from the shapes `shape.propagate` recorded. This is fxslim's one
cost counter (the pass manager recomputes it after every pass). We count ourselves rather than use
`torch.utils.flop_counter.FlopCounterMode`, which reads fused attention as zero (docs/notes/facts.md). The MAC rules
are ONE table, `MAC_RULES`, keyed by module type, function object or Tensor-method name; adding an op is
adding a row. This file must never change the graph or the weights, and never guess MACs for an op that
has no row: such ops count 0 and, when they are modules holding parameters (custom leaf layers), are
listed in `Cost.uncounted`.

Params: a call_module node owns all parameters of its module (recursively, so a leaf block counts whole),
a get_attr node the Parameter (or module) it fetches; the total is `sum(p.numel() for p in
gm.parameters())`, so a module called twice shows its params on both rows but counts once in the total.

MAC conventions (a MAC is one multiply-accumulate; FLOPs are about 2x MACs):
  * conv (Conv1d/2d/3d, F.conv*): out_numel * Cin/groups * prod(kernel) (stride/padding/dilation show up
    through the output shape); bias adds are not counted.
  * transposed conv: in_numel * Cout/groups * prod(kernel), i.e. every input element times every kernel
    tap, including taps that land in the cropped `padding` border (the dense scatter the kernel does).
  * linear / matmul / mm / bmm / `@` / addmm / baddbmm: out_numel * K (K = contracted dimension).
  * F.scaled_dot_product_attention: B*L*S*E (Q K^T) + B*L*S*Ev (A V), B = all leading dims of the
    query (heads included); dense even when causal or masked; softmax and scaling not counted.
  * Swin shifted-window attention (torchvision's `shifted_window_attention`, fxslim's
    `slim_window_attention`), x [B, H, W, C] padded to whole windows [B, Hp, Wp, C], N tokens per window,
    attention width A = qkv rows / 3, C_out = projection rows: B*Hp*Wp * (3*A*C + 2*N*A + A*C_out)
    (qkv projection, Q K^T and A V inside each window, output projection); the cpb-MLP of V2 is its own
    linears; the mask, softmax and cosine normalisation are not counted.
  * nn.MultiheadAttention (a leaf): Q, K, V input projections + Q K^T + A V + output projection, from the
    module's dims and the actual query/key shapes (batch_first either way, unbatched inputs too);
    fxslim's SlimMultiheadAttention (what a pruned one becomes: input width D, H heads of width d, output
    width O, inner width A = H*d) the same with its own widths: L*D*A + 2*S*D*A + 2*L*S*A + L*A*O.
  * norms (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm and their F.* forms): 1 MAC per output
    element (the per-element affine `x*scale + shift` that remains in deployment; statistics ignored).
  * pooling (max/avg, 1-3 d): out_numel * window size, one "MAC" per element read; adaptive pooling
    uses its exact windows (start = floor(i*In/Out), end = ceil((i+1)*In/Out)), which is
    out_numel * (In/Out)^d when the sizes divide.
  * element-wise ops (add, mul, relu, gelu, sigmoid, softmax, ...), data movement (view, cat, permute,
    getitem, ...) and every op without a row (einsum included): 0 MACs."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.errors import AnalysisError
from fxslim.graph.shape import out_shape, propagate
from fxslim.modules import SlimMultiheadAttention, slim_window_attention


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node: parameters it owns directly (a call_module's module, a get_attr'd Parameter)
    and the MACs it performs on the example inputs."""

    params: int
    macs: int


@dataclass
class Cost:
    """Totals for a graph. `params` is `sum(p.numel() for p in gm.parameters())` (each shared parameter
    once, even when per-node rows repeat it); `macs` is the sum of the per-node MACs; `uncounted` names
    nodes whose module holds parameters but has no MAC rule (so `macs` is a lower bound when non-empty)."""

    params: int
    macs: int
    per_node: dict[str, NodeCost]
    uncounted: list[str] = field(default_factory=list)


MacRule = Callable[[fx.Node, "nn.Module | None"], int]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument given either positionally or by keyword."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape_of(value: Any) -> tuple[int, ...]:
    """Shape of an argument: a propagated node or a constant tensor."""
    if isinstance(value, fx.Node):
        shape = out_shape(value)
        if shape is None:
            raise _NoShape(value)
        return shape
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    raise _NoShape(value)


class _NoShape(Exception):
    """Internal: an argument the rule needs has no tensor shape (reported as AnalysisError by annotate)."""


def _first_output_shape(node: fx.Node) -> tuple[int, ...]:
    """Output shape, or the first tensor's shape when the op returns a tuple (max_pool with indices)."""
    meta = node.meta.get("tensor_meta")
    shape = out_shape(node)
    if shape is not None:
        return shape
    if isinstance(meta, (tuple, list)) and meta and hasattr(meta[0], "shape"):
        return tuple(int(d) for d in meta[0].shape)
    raise _NoShape(node)


def _weight_shape(node: fx.Node, module: nn.Module | None) -> tuple[int, ...]:
    return tuple(module.weight.shape) if module is not None else _shape_of(_arg(node, 1, "weight"))


def _conv(node: fx.Node, module: nn.Module | None) -> int:
    # weight is [Cout, Cin/groups, *kernel]: its trailing product is the work per output element.
    return math.prod(_first_output_shape(node)) * math.prod(_weight_shape(node, module)[1:])


def _conv_transpose(node: fx.Node, module: nn.Module | None) -> int:
    # weight is [Cin, Cout/groups, *kernel]: each input element is scattered through all of it.
    return math.prod(_shape_of(_arg(node, 0, "input"))) * math.prod(_weight_shape(node, module)[1:])


def _linear(node: fx.Node, module: nn.Module | None) -> int:
    return math.prod(_first_output_shape(node)) * _weight_shape(node, module)[-1]


def _matmul(index: int, name: str) -> MacRule:
    """out_numel * K for a product whose left factor is argument `index`/`name` (K = its last dim, which
    also holds for 1-D factors and broadcast batch dims)."""

    def rule(node: fx.Node, module: nn.Module | None) -> int:
        return math.prod(_first_output_shape(node)) * _shape_of(_arg(node, index, name))[-1]

    return rule


def _sdpa(node: fx.Node, module: nn.Module | None) -> int:
    q = _shape_of(_arg(node, 0, "query"))
    k = _shape_of(_arg(node, 1, "key"))
    v = _shape_of(_arg(node, 2, "value"))
    batch, length, e = math.prod(q[:-2]), q[-2], q[-1]
    return batch * length * k[-2] * (e + v[-1])


def _attention_lengths(node: fx.Node, batch_first: bool) -> tuple[int, int, int]:
    """(batch, query length, key length) of a multi-head attention call (nn.MultiheadAttention's layouts)."""
    q = _shape_of(_arg(node, 0, "query"))
    k = _shape_of(_arg(node, 1, "key"))
    if len(q) == 2:  # unbatched (L, E)
        return 1, q[0], k[0]
    if batch_first:  # (N, L, E)
        return q[0], q[1], k[1]
    return q[1], q[0], k[0]  # (L, N, E)


def _multihead_attention(node: fx.Node, module: nn.MultiheadAttention) -> int:
    batch, length, source = _attention_lengths(node, module.batch_first)
    e = module.embed_dim
    # bias_k/bias_v and add_zero_attn each append one key position before attention.
    attended = source + (module.bias_k is not None) + int(module.add_zero_attn)
    projections = length * e * e + source * module.kdim * e + source * module.vdim * e + length * e * e
    attention = 2 * length * attended * e  # Q K^T and A V over all heads (heads * head_dim = E)
    return batch * (projections + attention)


def _slim_multihead_attention(node: fx.Node, module: SlimMultiheadAttention) -> int:
    batch, length, source = _attention_lengths(node, module.batch_first)
    inner, in_dim = module.num_heads * module.head_dim, module.in_proj_weight.shape[1]
    projections = length * in_dim * inner + 2 * source * in_dim * inner + length * inner * module.out_proj.out_features
    return batch * (projections + 2 * length * source * inner)


def _window_attention(node: fx.Node, module: nn.Module | None) -> int:
    b, h, w, c = _shape_of(_arg(node, 0, "input"))
    attention = _shape_of(_arg(node, 1, "qkv_weight"))[0] // 3
    c_out = _shape_of(_arg(node, 2, "proj_weight"))[0]
    wh, ww = _arg(node, 4, "window_size")
    padded = b * (-(-h // wh) * wh) * (-(-w // ww) * ww)  # tokens after padding to whole windows
    return padded * (3 * attention * c + 2 * wh * ww * attention + attention * c_out)


def _per_output_element(node: fx.Node, module: nn.Module | None) -> int:
    return math.prod(_first_output_shape(node))


def _tuple_of(value: Any, spatial: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * spatial


def _pool(spatial: int) -> MacRule:
    """out_numel * prod(kernel) for fixed-window pooling with `spatial` window dims."""

    def rule(node: fx.Node, module: nn.Module | None) -> int:
        kernel = module.kernel_size if module is not None else _arg(node, 1, "kernel_size")
        return math.prod(_first_output_shape(node)) * math.prod(_tuple_of(kernel, spatial))

    return rule


def _adaptive_window_sum(size_in: int, size_out: int) -> int:
    """Total elements read along one dim by adaptive pooling (PyTorch's start/end index formula)."""
    return sum(-(-((i + 1) * size_in) // size_out) - (i * size_in) // size_out for i in range(size_out))


def _adaptive_pool(spatial: int) -> MacRule:
    def rule(node: fx.Node, module: nn.Module | None) -> int:
        shape_in = _shape_of(_arg(node, 0, "input"))
        shape_out = _first_output_shape(node)
        outer = math.prod(shape_out[:-spatial])
        windows = [_adaptive_window_sum(i, o) for i, o in zip(shape_in[-spatial:], shape_out[-spatial:], strict=True)]
        return outer * math.prod(windows)

    return rule


# The one table: module type (matched along the MRO, so subclasses inherit), function object, or
# Tensor-method name -> MAC rule. Anything not here counts 0 MACs.
MAC_RULES: dict[Any, MacRule] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    nn.ConvTranspose1d: _conv_transpose,
    nn.ConvTranspose2d: _conv_transpose,
    nn.ConvTranspose3d: _conv_transpose,
    F.conv_transpose1d: _conv_transpose,
    F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    nn.Linear: _linear,
    F.linear: _linear,
    torch.matmul: _matmul(0, "input"),
    torch.mm: _matmul(0, "input"),
    torch.bmm: _matmul(0, "input"),
    operator.matmul: _matmul(0, "input"),
    torch.addmm: _matmul(1, "mat1"),
    torch.baddbmm: _matmul(1, "batch1"),
    "matmul": _matmul(0, "input"),
    "__matmul__": _matmul(0, "input"),
    "mm": _matmul(0, "input"),
    "bmm": _matmul(0, "input"),
    F.scaled_dot_product_attention: _sdpa,
    nn.MultiheadAttention: _multihead_attention,
    SlimMultiheadAttention: _slim_multihead_attention,
    slim_window_attention: _window_attention,
    nn.BatchNorm1d: _per_output_element,
    nn.BatchNorm2d: _per_output_element,
    nn.BatchNorm3d: _per_output_element,
    nn.SyncBatchNorm: _per_output_element,
    nn.LayerNorm: _per_output_element,
    nn.GroupNorm: _per_output_element,
    nn.InstanceNorm1d: _per_output_element,
    nn.InstanceNorm2d: _per_output_element,
    nn.InstanceNorm3d: _per_output_element,
    nn.RMSNorm: _per_output_element,
    F.batch_norm: _per_output_element,
    F.layer_norm: _per_output_element,
    F.group_norm: _per_output_element,
    F.instance_norm: _per_output_element,
    F.rms_norm: _per_output_element,
    nn.MaxPool1d: _pool(1),
    nn.MaxPool2d: _pool(2),
    nn.MaxPool3d: _pool(3),
    nn.AvgPool1d: _pool(1),
    nn.AvgPool2d: _pool(2),
    nn.AvgPool3d: _pool(3),
    F.max_pool1d: _pool(1),
    F.max_pool2d: _pool(2),
    F.max_pool3d: _pool(3),
    F.avg_pool1d: _pool(1),
    F.avg_pool2d: _pool(2),
    F.avg_pool3d: _pool(3),
    nn.AdaptiveMaxPool1d: _adaptive_pool(1),
    nn.AdaptiveMaxPool2d: _adaptive_pool(2),
    nn.AdaptiveMaxPool3d: _adaptive_pool(3),
    nn.AdaptiveAvgPool1d: _adaptive_pool(1),
    nn.AdaptiveAvgPool2d: _adaptive_pool(2),
    nn.AdaptiveAvgPool3d: _adaptive_pool(3),
    F.adaptive_max_pool1d: _adaptive_pool(1),
    F.adaptive_max_pool2d: _adaptive_pool(2),
    F.adaptive_max_pool3d: _adaptive_pool(3),
    F.adaptive_avg_pool1d: _adaptive_pool(1),
    F.adaptive_avg_pool2d: _adaptive_pool(2),
    F.adaptive_avg_pool3d: _adaptive_pool(3),
}


def _register_torchvision() -> None:
    """Rows for the ops torchvision wraps with torch.fx.wrap (they appear as calls in a traced graph)."""
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # pragma: no cover - torchvision is a dependency, but the table must not need it
        return
    MAC_RULES[swin.shifted_window_attention] = _window_attention


_register_torchvision()


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _rule_for(node: fx.Node, module: nn.Module | None) -> MacRule | None:
    if module is not None:
        return next((MAC_RULES[c] for c in type(module).__mro__ if c in MAC_RULES), None)
    if node.op == "call_method":
        return MAC_RULES.get(node.target)
    if node.op == "call_function":
        try:
            return MAC_RULES.get(node.target)
        except TypeError:  # an unhashable callable cannot have a row
            return None
    return None


def _module_of(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = modules.get(str(node.target))
    return module if module is not None else gm.get_submodule(str(node.target))


def _node_params(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None) -> int:
    if module is not None:
        return sum(p.numel() for p in module.parameters())
    if node.op == "get_attr":
        value = _fetch_attr(gm, str(node.target))
        if isinstance(value, nn.Parameter):
            return value.numel()
        if isinstance(value, nn.Module):
            return sum(p.numel() for p in value.parameters())
    return 0


def annotate(gm: fx.GraphModule, example_inputs: tuple) -> Cost:
    """Propagate shapes, set `node.meta['cost'] = NodeCost(...)` on every node, and return the totals."""
    propagate(gm, example_inputs, reuse=True)
    per_node: dict[str, NodeCost] = {}
    uncounted: list[str] = []
    modules = dict(gm.named_modules(remove_duplicate=False))  # one table, not a path walk per node
    for node in gm.graph.nodes:
        module = _module_of(gm, node, modules)
        params = _node_params(gm, node, module)
        rule = _rule_for(node, module)
        try:
            macs = int(rule(node, module)) if rule is not None else 0
        except _NoShape as e:
            raise AnalysisError(
                f"cannot count MACs of node {node.name!r} (op={node.op}, target={node.target}): "
                f"argument {e.args[0]!r} has no tensor shape"
            ) from None
        except Exception as e:  # a rule meeting call arguments it does not understand
            raise AnalysisError(
                f"cannot count MACs of node {node.name!r} (op={node.op}, target={node.target}): {type(e).__name__}: {e}"
            ) from e
        if rule is None and module is not None and params > 0:
            uncounted.append(node.name)
        node.meta["cost"] = per_node[node.name] = NodeCost(params=params, macs=macs)
    total_params = sum(p.numel() for p in gm.parameters())
    return Cost(total_params, sum(c.macs for c in per_node.values()), per_node, uncounted)


def count(model_or_gm: nn.Module, example_inputs: tuple) -> Cost:
    """Params and MACs of a model on `example_inputs`; a plain nn.Module is traced first (with fxslim's
    tracer and its default leaf policy), a GraphModule is annotated in place."""
    if isinstance(model_or_gm, fx.GraphModule):
        gm = model_or_gm
    else:
        from fxslim.trace import trace  # lazy: the tracer imports the graph package, not the other way

        gm = trace(model_or_gm, example_inputs)
    return annotate(gm, example_inputs)
