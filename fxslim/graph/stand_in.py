"""Stand-ins for conv and linear layers during shape propagation.

Shape propagation needs each node's output metadata, not its values, yet running the model's convolutions
and matrix products is most of its time on a CNN. For a layer of an exact `torch.nn` conv/linear type, the
output shape follows from the input shape and the layer's configuration, so the propagation records a zero
tensor of that shape instead of running the kernel (ResNet-50 at 64x64: 42 ms with every node run, 7.5 ms
with stand-ins, one thread).

This is exact only where no later shape depends on the values, so it is used under these conditions and
the plain run is the fallback:
- `graph_allows(gm, modules)`: every module the graph calls is a `torch.nn` type and every function comes
  from torch, `operator`, `math` or the builtins, or is one of torchvision's few fx-wrapped helpers that
  branch on shapes only (no user code that could read values and branch on them); and no op's output shape
  follows its input values (`nonzero`, `unique`, `masked_select`, `.item()`, ...);
- `output_of(module, args, kwargs)` gives a stand-in only for a plain dense input with row-major strides, of
  the (contiguous) weight's dtype and device, whose channel count fits the weight; anything else runs the
  real layer, which raises torch's own error when it does not fit;
- an index made of a tensor (`x[mask]`) after a stand-in, or any exception in the run, aborts it and the
  shapes are propagated again by running every node (`shape.propagate`).
The stand-in has row-major strides, which is what torch's kernels give for such an input.
tests/graph/test_stand_in.py compares every node's metadata with the plain run's on random layers, random
networks and torchvision classifiers."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

LAYERS = frozenset({nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear})

# Ops whose output shape depends on the input values (or that hand values to Python).
_VALUE_SHAPED = frozenset({
    torch.nonzero, torch.argwhere, torch.masked_select, torch.unique, torch.unique_consecutive,
    torch.bincount, torch.repeat_interleave, torch.histc, torch.histogram,
})
_VALUE_SHAPED_METHODS = frozenset({
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave",
    "histc", "histogram", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
})
_KNOWN_MODULE_PREFIXES = ("torch.", "_operator", "operator", "math", "builtins")
# Functions torchvision keeps opaque to fx (`torch.fx.wrap`) whose Python branches on shapes and
# configuration only (read in torchvision 0.29's source).
_SHAPE_ONLY_EXTERNAL = frozenset({
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("torchvision.models.swin_transformer", "shifted_window_attention"),
    ("torchvision.models.swin_transformer", "_get_relative_position_bias"),
    ("torchvision.models.swin_transformer", "_patch_merging_pad"),
})
_GETITEM = (operator.getitem,)


def _known_function(fn: Any) -> bool:
    if fn in _VALUE_SHAPED:
        return False
    if fn is torch.where:  # where(cond) alone is nonzero; the three-argument form is elementwise
        return True
    module = getattr(fn, "__module__", None) or ""
    return (module == "torch" or module.startswith(_KNOWN_MODULE_PREFIXES)
            or (module, getattr(fn, "__name__", None)) in _SHAPE_ONLY_EXTERNAL)


def graph_allows(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> bool:
    """True when no node of `gm` could make a shape depend on values (see the module docstring)."""
    for node in gm.graph.nodes:
        op = node.op
        if op == "call_module":
            module = modules.get(node.target)
            if module is None or not type(module).__module__.startswith("torch.nn"):
                return False
        elif op == "call_function":
            if not _known_function(node.target) or (node.target is torch.where and len(node.args) == 1
                                                     and not node.kwargs):
                return False
        elif op == "call_method":
            if node.target in _VALUE_SHAPED_METHODS or (node.target == "where" and len(node.args) == 1):
                return False
    return True


def index_reads_values(node: fx.Node, args: tuple) -> bool:
    """A getitem whose index holds a tensor (a mask or an index array): its shape may follow values."""
    if not ((node.op == "call_function" and node.target in _GETITEM)
            or (node.op == "call_method" and node.target == "__getitem__")):
        return False
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) for p in parts)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides `torch.empty(shape)` has."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _plain(x: Any, weight: torch.Tensor) -> bool:
    """A dense tensor laid out as `torch.empty` lays it out, of the weight's dtype and device. Strides count,
    not just contiguity: where size-1 dims make a tensor contiguous in two layouts (1xCx1x1), torch's conv
    keeps the layout its input's strides spell, and a channels-last weight makes it answer channels-last."""
    return (type(x) is torch.Tensor and x.layout is torch.strided and not x.is_quantized
            and x.dtype == weight.dtype and x.device == weight.device
            and x.stride() == _row_major_strides(x.shape) and weight.is_contiguous())


def _conv_shape(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[int, ...] | None:
    w = m.weight
    n = w.dim() - 2
    if m.padding_mode != "zeros" or len(m.stride) != n or x.dim() not in (n + 1, n + 2):
        return None
    if x.shape[-n - 1] != w.shape[1] * m.groups or w.shape[0] % m.groups:
        return None
    size = x.shape[-n:]
    if m.padding == "same":
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
    where the layer must run (hooks, an input that is not a plain contiguous tensor of the weight's dtype
    and device, a shape that does not fit, padding modes other than zeros)."""
    if kwargs or len(args) != 1 or module._forward_hooks or module._forward_pre_hooks:
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    (x,) = args
    w = module.weight
    if not _plain(x, w) or (module.bias is not None and tuple(module.bias.shape) != (w.shape[0],)):
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
