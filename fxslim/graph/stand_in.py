"""Stand-ins for conv and linear layers during shape propagation.

Shape propagation needs each node's output metadata, not its values, yet running the model's convolutions
and matrix products is most of its time on a CNN. For a layer of an exact `torch.nn` conv/linear type, the
output shape follows from the input shape and the layer's configuration, so the propagation records a zero
tensor of that shape instead of running the kernel (ResNet-50 at 64x64: 42 ms with every node run, 7.5 ms
with stand-ins, one thread).

The zeros are wrong values, so they may only flow where values cannot change any metadata or raise:
- `graph_allows`: every op of the graph is on the allowlists below (torch.nn modules, torch functions and
  tensor methods whose output metadata follows from their inputs' metadata and their non-tensor arguments,
  e.g. no `nonzero`, `item`, `Embedding`, user code), nothing runs in place on an input or a parameter (a
  fallback would repeat it), and no autocast is active;
- `output_of` gives a stand-in only for a call with no hooks or instance-level `forward`, on a plain dense
  input with row-major strides, a row-major weight and bias of the input's dtype and device, channels that fit
  the weight, padding mode zeros; anything else runs the layer, which raises torch's own error if it fails;
- `Flow` follows the values that come from stand-ins through the run: they may enter an op only as data
  (an elementwise operand, the tensor a view or reduction is taken of), never as a size, an index, a
  condition checked by `torch._assert` or anything a shape could be read from. Any other use raises
  `ValuesMatter`, and `shape.propagate` then runs every node again, as it does after any exception.
The stand-in has row-major strides, which is what torch's kernels give for such an input.
tests/graph/test_stand_in.py compares every node's metadata with the plain run's on random layers, random
networks, torchvision classifiers and graphs where values decide a shape."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

LAYERS = frozenset({nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear})


class ValuesMatter(Exception):
    """A stand-in's values reached an op whose output metadata (or success) may depend on them."""


# torch.nn modules whose output metadata follows from the input metadata and the configuration; every
# tensor argument is data.
_MODULES = frozenset({
    *LAYERS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear, nn.Identity,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.GLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten, nn.Unflatten,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.MultiheadAttention,
})
# Functions every tensor argument of which is data (elementwise operands, concatenated parts, layer inputs).
_ALL_DATA = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg, operator.pos,
    operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.mm, torch.einsum,
    torch.cat, torch.concat, torch.stack, torch.maximum, torch.minimum, torch.addmm, torch.baddbmm,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention, F.layer_norm, F.group_norm,
    F.batch_norm,
})
# Functions whose first argument is the data and whose others are sizes, dims or settings.
_FIRST_DATA = frozenset({
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
    torch.movedim, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.narrow,
    torch.roll, torch.flip, torch.mean, torch.sum, torch.amax, torch.amin, torch.softmax, torch.sigmoid,
    torch.tanh, torch.relu, torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt, torch.erf, torch.clamp,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.sigmoid, F.tanh, F.softmax, F.log_softmax, F.dropout, F.normalize, F.pad, F.interpolate,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d, F.pixel_shuffle, F.pixel_unshuffle,
    F.channel_shuffle,
})
_METHODS_ALL_DATA = frozenset({
    "add", "sub", "mul", "div", "matmul", "bmm", "expand_as", "type_as", "view_as", "reshape_as",
    "maximum", "minimum", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__matmul__",
})
_METHODS_FIRST_DATA = frozenset({
    "view", "reshape", "permute", "transpose", "swapaxes", "movedim", "flatten", "unflatten", "expand",
    "repeat", "contiguous", "chunk", "split", "unbind", "unsqueeze", "squeeze", "narrow", "roll", "flip",
    "t", "mean", "sum", "amax", "amin", "softmax", "log_softmax", "sigmoid", "tanh", "relu", "exp", "log",
    "abs", "sqrt", "rsqrt", "neg", "clamp", "pow", "to", "float", "half", "double", "bfloat16", "clone",
    "detach", "__getitem__",
})
# Queries whose answer is metadata: the stand-in answers them as the real value would.
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "layout"})
# Functions that may appear as long as no stand-in value reaches them (size arithmetic, shape checks).
_NO_DATA = frozenset({
    getattr, torch._assert, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.floordiv, operator.mod,
})
# torchvision functions kept opaque to fx (`torch.fx.wrap`) that branch on shapes and configuration only
# (read in torchvision 0.29's source): every tensor argument is data (shifted_window_attention's weights and
# position bias, stochastic_depth's input), or only the first is (the relative-position look-up's index
# decides what it gathers).
_TORCHVISION_ALL_DATA = frozenset({
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("torchvision.models.swin_transformer", "shifted_window_attention"),
})
_TORCHVISION_FIRST_DATA = frozenset({
    ("torchvision.models.swin_transformer", "_get_relative_position_bias"),
    ("torchvision.models.swin_transformer", "_patch_merging_pad"),
})
_VIEWS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
                    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.narrow})
_VIEW_METHODS = frozenset({"view", "reshape", "permute", "transpose", "flatten", "unflatten", "expand",
                           "contiguous", "chunk", "split", "unsqueeze", "squeeze", "narrow", "t", "__getitem__"})


def _qualified(fn: Any) -> tuple:
    return getattr(fn, "__module__", None), getattr(fn, "__name__", None)


def _all_data_function(fn: Any) -> bool:
    return fn in _ALL_DATA or _qualified(fn) in _TORCHVISION_ALL_DATA


def _first_data_function(fn: Any) -> bool:
    return fn in _FIRST_DATA or _qualified(fn) in _TORCHVISION_FIRST_DATA


def _known(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    op, target = node.op, node.target
    if op == "call_module":
        return type(modules.get(target)) in _MODULES
    if op == "call_function":
        try:
            return _all_data_function(target) or target in _NO_DATA or _first_data_function(target)
        except TypeError:  # an unhashable target
            return False
    if op == "call_method":
        return target in _METHODS_ALL_DATA or target in _METHODS_FIRST_DATA or target in _SHAPE_METHODS
    return True


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _root(node: fx.Node) -> fx.Node:
    """The value `node` is a view of, following view-like ops back."""
    while node.args and isinstance(node.args[0], fx.Node) and (
        (node.op == "call_function" and node.target in _VIEWS)
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
    ):
        node = node.args[0]
    return node


def _autocast() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


def graph_allows(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> bool:
    """True when stand-ins may be tried on `gm` (see the module docstring)."""
    if _autocast():
        return False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if not _known(node, modules):
            return False
        if _in_place(node, modules):
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and _root(first).op in ("placeholder", "get_attr"):
                return False
    return True


def _nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


class Flow:
    """The nodes whose values come from stand-ins, and the check that they are used only as data."""

    def __init__(self) -> None:
        self.carriers: set[fx.Node] = set()

    def started(self) -> bool:
        return bool(self.carriers)

    def add(self, node: fx.Node) -> None:
        self.carriers.add(node)

    def check(self, node: fx.Node) -> None:
        """Record whether `node`'s value derives from a stand-in; raise ValuesMatter where it could
        derive metadata from one. Call before running `node`, only once a stand-in was used."""
        carriers = self.carriers
        if not any(a in carriers for a in node.all_input_nodes):
            return
        op, target = node.op, node.target
        if op == "output":
            return
        if op == "call_module" or (op == "call_function" and _all_data_function(target)) or (
                op == "call_method" and target in _METHODS_ALL_DATA):
            carriers.add(node)  # graph_allows admitted only _MODULES as modules
            return
        if op == "call_method" and target in _SHAPE_METHODS and not any(
                a in carriers for a in _nodes((node.args[1:], node.kwargs))):
            return
        if op == "call_function" and target is getattr and len(node.args) == 2:
            if node.args[1] in _SHAPE_ATTRS:
                return
            raise ValuesMatter(node.name)
        first_data = (op == "call_method" and target in _METHODS_FIRST_DATA) or (
            op == "call_function" and _first_data_function(target))
        if first_data and not any(a in carriers for a in _nodes((node.args[1:], node.kwargs))):
            carriers.add(node)
            return
        raise ValuesMatter(node.name)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides `torch.empty(shape)` has."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _row_major(t: torch.Tensor) -> bool:
    return t.stride() == _row_major_strides(t.shape)


def _plain(x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A dense input laid out as `torch.empty` lays it out, and a weight and bias of its dtype and device,
    the weight row-major too. Strides count, not just contiguity: where size-1 dims make a tensor contiguous
    in two layouts (1xCx1x1, a 1x1 conv's weight), torch's conv keeps the layout the strides spell."""
    if type(x) is not torch.Tensor or x.layout is not torch.strided or x.is_quantized or not _row_major(x):
        return False
    if weight.dtype != x.dtype or weight.device != x.device or not _row_major(weight):
        return False
    return bias is None or (bias.dtype == x.dtype and bias.device == x.device and tuple(bias.shape) == (
        weight.shape[0],))


def _conv_shape(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[int, ...] | None:
    w = m.weight
    n = w.dim() - 2
    if m.padding_mode != "zeros" or len(m.stride) != n or x.dim() not in (n + 1, n + 2):
        return None
    if x.shape[-n - 1] != w.shape[1] * m.groups or w.shape[0] % m.groups:
        return None
    size = x.shape[-n:]
    if m.padding == "same":
        if any(s != 1 for s in m.stride):
            return None
        out = list(size)
    else:
        pad = (0,) * n if m.padding == "valid" else m.padding
        out = [(i + 2 * p - d * (k - 1) - 1) // s + 1
               for i, p, d, k, s in zip(size, pad, m.dilation, w.shape[2:], m.stride, strict=True)]
    if min(out) <= 0:
        return None
    return (*x.shape[:-n - 1], w.shape[0], *out)


def output_of(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A zero tensor shaped like `module(*args)` for a conv/linear layer of an exact LAYERS type, or None
    where the layer must run (see the module docstring)."""
    if kwargs or len(args) != 1 or module._forward_hooks or module._forward_pre_hooks:
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    if "forward" in module.__dict__ or "_conv_forward" in module.__dict__:  # overridden on the instance
        return None
    (x,) = args
    w = module.weight
    if not _plain(x, w, module.bias):
        return None
    if type(module) is nn.Linear:
        if w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1]:
            return None
        shape = (*x.shape[:-1], w.shape[0])
    else:
        shape = _conv_shape(module, x)
        if shape is None:
            return None
    if not math.prod(shape):
        return None
    return torch.zeros(shape, dtype=x.dtype, device=x.device)
