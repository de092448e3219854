"""Memory-bound ops for the latency model of `prune_channels(objective="latency")` (`fxslim.latency_plan`).

A conv or linear layer's time is measured with its weights (`fxslim.latency_plan`); the ops between
layers carry no MACs but cost time in proportion to the elements they read: norms, activations, elementwise
arithmetic, pooling, softmax, concatenation. On ConvNeXt-Tiny at 224x224 they are about a fifth of the
onnxruntime run (GELU 8 %, depthwise convs 5 %, LayerNorm, Add, Mul, layout reorders; docs/results/latency_224.md),
a share that channel pruning shrinks only linearly where the MACs shrink quadratically. Leaving them out makes
the greedy blind to which groups carry them.

`op_nodes(gm)` lists the nodes that count and `op_seconds(gm, node, table)` times one of them alone: the node
copied into a graph of its own, its first tensor input fed at its recorded shape, any other tensor input a
constant of its shape, exported to ONNX and timed by `fxslim.latency.module_latency` (cached in the same
`LatencyTable` as the layers). The time of an op on a one-element tensor (the per-run overhead of a session)
is subtracted, and the planner scales what is left with the kept fraction of the op's output channels.

View-like ops (reshape, permute, flatten, getitem, ...) do not count: onnxruntime removes most transposes of
a conv net when it changes the layout. Neither do the ops onnxruntime 1.32 fuses into the conv (or 2-D
linear) before them, checked with `fxslim.export.op_counts` on the optimised graph: BatchNorm after a conv;
ReLU / ReLU6 / Hardtanh / Hardsigmoid / Hardswish / Sigmoid / Tanh / LeakyReLU after a conv, and ReLU /
Hardsigmoid / Sigmoid / Tanh / LeakyReLU after a 2-D linear (module, function or method); a multiply of a
conv output by a constant (a parameter, or a value computed from parameters alone: a folded scale); a
residual add that takes a conv output (BN and scale folded); and an activation after such an add (ResNet's
conv → BN → add → ReLU is one fused conv). Each rule needs the value it fuses to be read by nothing else;
identities of eval mode (dropout, stochastic depth) are looked through. SiLU and GELU are not fused and
count. Ops outside the lists are left out, and so is an op computed from constants alone. On the six
models of tools/bench_latency.py the counted ops are exactly the memory-bound ops onnxruntime's optimised
graph keeps (pooling, SE multiplies, SiLU, LayerNorm, GELU, unfused adds)."""

from __future__ import annotations

import copy
import operator

import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.latency import LatencyTable, module_latency
from fxslim.ops import is_latency_op

_MODULES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Softmax,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
)
_FUNCTIONS = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    torch.cat,
    torch.sigmoid,
    torch.relu,
    torch.tanh,
    torch.softmax,
    torch.mean,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.layer_norm,
    F.softmax,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
}
_METHODS = {"add", "mul", "sub", "div", "sigmoid", "relu", "tanh", "softmax", "mean"}
# activations onnxruntime 1.32 fuses into the conv / the 2-D linear (Gemm) before them, on the CPU
_CONV_ACTIVATIONS = (
    (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.LeakyReLU),
    {torch.relu, F.relu, F.relu6, torch.sigmoid, torch.tanh, F.hardsigmoid, F.hardswish},
    {"relu", "sigmoid", "tanh"},
)
_GEMM_ACTIVATIONS = (
    (nn.ReLU, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU),
    {torch.relu, F.relu, torch.sigmoid, torch.tanh, F.hardsigmoid},
    {"relu", "sigmoid", "tanh"},
)
_ADDS = {operator.add, torch.add}
_MULS = {operator.mul, torch.mul}
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _float_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if not hasattr(meta, "shape") or not meta.dtype.is_floating_point:
        return None
    return tuple(int(d) for d in meta.shape)


def _counts(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_latency_op(gm, node):  # declared with fxslim.register_op(..., latency="op")
        return True
    if node.op == "call_module":
        return isinstance(_module(gm, node), _MODULES)
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    return node.op == "call_method" and node.target in _METHODS


def _passes_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity in eval: identity and dropout modules, torchvision's stochastic depth with training=False."""
    if isinstance(_module(gm, node), _PASS_THROUGH):
        return bool(node.args)
    return (
        node.op == "call_function"
        and getattr(node.target, "__name__", "") == "stochastic_depth"
        and len(node.args) == 4
        and node.args[3] is False
    )


def _sole_value(gm: fx.GraphModule, node) -> fx.Node | None:
    """The node that computes `node`'s value, looking through ops that are identities in eval, when that
    value is read by one node only (onnxruntime fuses an op into its producer only then); else None."""
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if not _passes_through(gm, node):
            return node
        node = node.args[0]
    return None


def _is_activation(gm: fx.GraphModule, node: fx.Node, kinds: tuple) -> bool:
    modules, functions, methods = kinds
    return (
        isinstance(_module(gm, node), modules)
        or (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods)
    )


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Parameters and buffers, and the values computed from those alone (onnxruntime folds them to
    constants): one pass in graph order."""
    found: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (
            n.op in ("call_function", "call_method", "call_module")
            and n.all_input_nodes
            and all(a in found for a in n.all_input_nodes)
        ):
            found.add(n)
    return found


def _conv_affine(gm: fx.GraphModule, node, consts: set) -> bool:
    """True when `node`'s value, read by nothing else, is a conv output with what onnxruntime folds into the
    conv's weights: its BatchNorm, a per-channel scale by a parameter."""
    node = _sole_value(gm, node)
    if node is None:
        return False
    return isinstance(_module(gm, node), (nn.Conv1d, nn.Conv2d)) or (_fused(gm, node, consts) and not _is_add(node))


def _fused(gm: fx.GraphModule, node: fx.Node, consts: set) -> bool:
    """Whether onnxruntime fuses `node` into the conv (or 2-D linear) whose output it takes."""
    first = node.args[0] if node.args else None
    src = _sole_value(gm, first)
    if isinstance(_module(gm, node), (nn.BatchNorm1d, nn.BatchNorm2d)):
        return src is not None and isinstance(_module(gm, src), (nn.Conv1d, nn.Conv2d))
    if _is_activation(gm, node, _GEMM_ACTIVATIONS) and src is not None:
        if isinstance(_module(gm, src), nn.Linear) and len(_float_shape(src) or ()) == 2:
            return True
    if _is_activation(gm, node, _CONV_ACTIVATIONS):
        return _conv_affine(gm, first, consts) or (src is not None and _is_add(src) and _fused(gm, src, consts))
    if _is_add(node):
        return any(_conv_affine(gm, a, consts) for a in node.args[:2])
    if node.op == "call_function" and node.target in _MULS and len(node.args) == 2:
        scale = [a for a in node.args if isinstance(a, fx.Node) and a in consts]
        others = [a for a in node.args if a not in scale]
        return len(scale) == 1 and len(others) == 1 and _conv_affine(gm, others[0], consts)  # a folded scale
    return False


def op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The memory-bound nodes the latency model counts, in graph order (float outputs only)."""
    consts = _constants(gm)
    return [
        n
        for n in gm.graph.nodes
        if _counts(gm, n)
        and _float_shape(n) is not None
        and n not in consts  # fed by the graph, not by constants alone
        and all(_float_shape(a) is not None for a in n.all_input_nodes if a.op != "get_attr")
        and not _fused(gm, n, consts)
    ]


def _standalone(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.GraphModule, tuple[int, ...], str]:
    """`node` alone in a GraphModule of one input, its other inputs constants; its input shape; a cache key."""
    root, graph, env, first, parts = nn.Module(), fx.Graph(), {}, None, []
    for i, a in enumerate(node.all_input_nodes):
        if a.op == "get_attr":
            value = _attr(gm, a.target)
            root.register_buffer(f"p{i}", value.detach().clone())
            env[a] = graph.get_attr(f"p{i}")
            parts.append(f"attr{tuple(value.shape)}")
        elif first is None:
            first = _float_shape(a)
            env[a] = graph.placeholder("x")
            parts.append(f"x{first}")
        else:
            shape = _float_shape(a)
            root.register_buffer(f"c{i}", torch.randn(shape, generator=torch.Generator().manual_seed(i)))
            env[a] = graph.get_attr(f"c{i}")
            parts.append(f"c{shape}")
    new = graph.node_copy(node, lambda a: env[a])
    if "inplace" in new.kwargs:  # timed on a fresh input each run: an in-place op would change it
        new.kwargs = {**new.kwargs, "inplace": False}
    if node.op == "call_module":
        mod = copy.copy(_module(gm, node))
        if getattr(mod, "inplace", False):
            mod.inplace = False
        root.add_module("op", mod)
        new.target = "op"
        what = " ".join(repr(mod).split())
    else:
        what = getattr(node.target, "__name__", str(node.target))
    graph.output(new)
    arguments = fx.node.map_arg((node.args, node.kwargs), lambda _: "*")  # tensors as *, named options kept
    key = f"op {node.op} {what} {arguments!r} @ {' '.join(parts)} ort={ort.__version__}"
    return fx.GraphModule(root, graph), first, key


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Neg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def overhead_seconds(table: LatencyTable, budget_s: float = 0.2) -> float:
    """Seconds of one onnxruntime run of a one-element op: what every standalone timing includes."""
    key = f"op overhead @ (1,) ort={ort.__version__}"
    return module_latency(_Neg(), (1,), table=table, budget_s=budget_s, save=False, key=key)


def op_seconds(gm: fx.GraphModule, node: fx.Node, table: LatencyTable, budget_s: float = 0.2) -> tuple[float, bool]:
    """Seconds `node` adds to a run (its standalone time less the per-run overhead, at least 0), and whether
    the table already held it."""
    module, shape, key = _standalone(gm, node)
    hit = table.get(key) is not None
    seconds = module_latency(module, shape, table=table, budget_s=budget_s, save=False, key=key)
    return max(0.0, seconds - overhead_seconds(table, budget_s)), hit
