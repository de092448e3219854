"""The e2cnn adapter: lets fxslim trace, analyse and compress models built from e2cnn layers as users write them.

An e2cnn model's forward wraps its input in a `GeometricTensor`, runs e2cnn modules (`R2Conv`,
`InnerBatchNorm`, `ReLU`, `PointwiseMaxPool`, `GroupPooling`, ...) and unwraps `.tensor`. torch.fx cannot run
that (GeometricTensor asserts its data is a real tensor; e2cnn forwards assert on field types and shapes), so
`plain_root` swaps every outermost e2cnn module of a copy of the model for its plain-torch `.export()`
(GroupPooling for the fx-traceable `GroupMaxPool`, which has a channel rule), and `geometric_tracing` lets the
tracer treat the GeometricTensor wrap and `.tensor` unwrap as identity. What the export loses is kept as
metadata in `gm.meta`: the declared symmetry group ("C4", "D4", ...) and the field layout (which channels of
each R2Conv form one field, the unit that pruning must remove whole). The dependency analyzer reads the
layout, the pass manager reads the group and checks invariance after every pass. This file never changes the
caller's model and never imports e2cnn unless the caller already has."""

from __future__ import annotations

import contextlib
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn

from fxslim.errors import PassError, TraceError
from fxslim.graph.rules.base import DepsBuilder, Ids
from fxslim.module_state import restored_modes
from fxslim.ops import register_op
from fxslim.symmetry import GROUP_META, LAYOUT_META, register_symmetry
from fxslim.trace import register_trace_adapter


@dataclass(frozen=True)
class FieldLayout:
    """How one R2Conv's input and output channels split into fields (a field is the unit of pruning).

    `layer` is the conv's qualified name, the same in the e2cnn model and in its traced plain twin.
    Output channels are `fields` × `field_size`, field f owning channels [f·field_size, (f+1)·field_size)."""

    layer: str
    fields: int
    field_size: int
    in_fields: int
    in_field_size: int


class GroupMaxPool(nn.Module):
    """Max over each field's `group_size` consecutive channels: the plain-torch GroupPooling of e2cnn.

    Same result as e2cnn's `MaxPoolChannels` (what `GroupPooling.export()` returns) but fx-traceable: no
    assert on the input shape, and -1 for the field count so that removing whole fields needs no edit.
    fxslim keeps it as a leaf with its own channel rule (graph/rules/layers.py): output channel f is input field f."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, self.group_size)).amax(2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


# ---------------------------------------------------------------------------------------------- detection


def _enn():
    """e2cnn.nn when the caller has imported e2cnn (an e2cnn model cannot exist otherwise), else None."""
    if "e2cnn" not in sys.modules:
        return None
    from e2cnn import nn as enn

    return enn


def is_e2cnn_model(model: nn.Module) -> bool:
    enn = _enn()
    return enn is not None and any(isinstance(m, enn.EquivariantModule) for m in model.modules())


def _field_size(ftype, where: str) -> int:
    sizes = {r.size for r in ftype.representations}
    if len(sizes) != 1:
        raise TraceError(f"e2cnn module {where!r}: fields of mixed sizes {sorted(sizes)} are not supported")
    return sizes.pop()


def field_layout(model: nn.Module) -> list[FieldLayout]:
    """One FieldLayout per R2Conv of an e2cnn model, in module order."""
    enn = _enn()
    if enn is None:
        return []
    return [
        FieldLayout(name, len(m.out_type), _field_size(m.out_type, name), len(m.in_type), _field_size(m.in_type, name))
        for name, m in model.named_modules()
        if isinstance(m, enn.R2Conv)
    ]


def group_name(model: nn.Module) -> str | None:
    """The symmetry group the e2cnn modules are declared on ("C4", "D4", ...); TraceError when several."""
    enn = _enn()
    names = {
        m.in_type.gspace.fibergroup.name
        for m in model.modules()
        if enn is not None and isinstance(m, enn.EquivariantModule) and hasattr(m, "in_type")
    }
    if len(names) > 1:
        raise TraceError(f"{type(model).__name__} mixes e2cnn modules on different groups: {sorted(names)}")
    return names.pop() if names else None


def rotations(group: str) -> list[int]:
    """The multiples k of 90° whose rotation `torch.rot90(x, k)` belongs to `group` (C_N, D_N: N % 4 == 0
    gives 1, 2, 3; N % 2 == 0 gives 2 only); empty when none (then there is nothing to check by rot90)."""
    m = re.fullmatch(r"[CD](\d+)", group or "")
    if m is None:
        return []
    n = int(m.group(1))
    return [1, 2, 3] if n % 4 == 0 else [2] if n % 2 == 0 else []


# ---------------------------------------------------------------------------------------------- export


def _export(m: nn.Module, where: str) -> nn.Module:
    enn = _enn()
    if isinstance(m, enn.GroupPooling):
        return GroupMaxPool(_field_size(m.in_type, where))
    if isinstance(m, enn.SequentialModule):
        return nn.Sequential(OrderedDict((name, _export(c, f"{where}.{name}")) for name, c in m._modules.items()))
    try:
        return m.export()
    except NotImplementedError as exc:
        raise TraceError(
            f"e2cnn module {where!r} ({type(m).__name__}) has no plain-torch export(); make it "
            "a leaf (leaf_modules=[...]) with a channel rule, or replace it"
        ) from exc


def plain_root(root: nn.Module) -> tuple[nn.Module, dict[int, object]]:
    """Replace, in `root` (a copy the caller owns), every outermost e2cnn module by its plain-torch export.

    Returns the root (the same object, or its export when the root itself is an e2cnn module) and, per
    exported module id, the e2cnn output field type (to re-wrap its output while tracing). The exports
    are deep copies: e2cnn hands back views of its cached expanded filters."""
    import copy

    enn = _enn()
    out_types: dict[int, object] = {}

    def swap(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            where = f"{prefix}{name}"
            if isinstance(child, enn.EquivariantModule):
                plain = copy.deepcopy(_export(child, where))
                out_types[id(plain)] = getattr(child, "out_type", None)
                parent._modules[name] = plain
            elif child is not None:
                swap(child, where + ".")

    if isinstance(root, enn.EquivariantModule):
        raise TraceError(
            f"{type(root).__name__} is itself an e2cnn module: trace the model that wraps it "
            "(a forward that builds the GeometricTensor), or trace root.export()"
        )
    with restored_modes(root):  # e2cnn's export() switches modules to eval; the copy keeps its caller's flags
        swap(root, "")
    return root, out_types


@contextlib.contextmanager
def geometric_tracing() -> Iterator[None]:
    """While tracing, a GeometricTensor may hold an fx Proxy (its asserts want a real tensor): the wrap
    becomes a plain record of (tensor, type), so `GeometricTensor(x, t).tensor` traces as `x`."""
    from e2cnn.nn import GeometricTensor

    original = GeometricTensor.__init__

    def init(self, tensor, type):  # noqa: A002 (e2cnn's parameter name)
        if isinstance(tensor, fx.Proxy):
            self.tensor, self.type = tensor, type
        else:
            original(self, tensor, type)

    GeometricTensor.__init__ = init
    try:
        yield
    finally:
        GeometricTensor.__init__ = original


def unwrap_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """GeometricTensor arguments of a plain module call become their `.tensor`."""
    from e2cnn.nn import GeometricTensor

    def un(a):
        return a.tensor if isinstance(a, GeometricTensor) else a

    return tuple(un(a) for a in args), {k: un(v) for k, v in kwargs.items()}


def wrap_output(out, field_type):
    """An exported module's output wrapped back in a GeometricTensor of the e2cnn module's output type."""
    from e2cnn.nn import GeometricTensor

    return out if field_type is None or not isinstance(out, fx.Proxy) else GeometricTensor(out, field_type)


def model_meta(model: nn.Module) -> dict:
    """The metadata fxslim keeps for an e2cnn model: {"group": "C4", "field_layout": [FieldLayout, ...]}."""
    group = group_name(model)
    return {GROUP_META: group, LAYOUT_META: field_layout(model)} if group else {}


# ---------------------------------------------------------------------------------------------- fields


def current_layout(gm: nn.Module, layout: list[FieldLayout]) -> list[FieldLayout]:
    """`layout` with the field counts read from the convs' current channel counts (after pruning); a layer
    whose channels are not whole fields is a PassError naming it."""
    modules = dict(gm.named_modules())
    out = []
    for f in layout:
        conv = modules.get(f.layer)
        if conv is None or not hasattr(conv, "weight"):
            continue
        cout, cin = conv.weight.shape[0], conv.weight.shape[1] * getattr(conv, "groups", 1)
        if cout % f.field_size or cin % f.in_field_size:
            raise PassError(
                f"layer {f.layer!r} has {cout} output / {cin} input channels, not whole fields of "
                f"{f.field_size} / {f.in_field_size}: a field must be removed whole or not at all"
            )
        out.append(replace(f, fields=cout // f.field_size, in_fields=cin // f.in_field_size))
    return out


def fields_to_keep(layout: list[FieldLayout], layer: str, channels) -> np.ndarray:
    """The field indices of `layer` that keeping output `channels` means; PassError when the channels cut
    through a field (a misaligned removal breaks equivariance: docs/notes/facts.md measured 0.2 error)."""
    entry = next((f for f in layout if f.layer == layer), None)
    if entry is None:
        raise PassError(f"no field layout for layer {layer!r}; layers with fields: {[f.layer for f in layout]}")
    keep = np.zeros(entry.fields * entry.field_size, dtype=bool)
    keep[np.asarray(channels, dtype=np.int64)] = True
    per_field = keep.reshape(entry.fields, entry.field_size)
    split = np.flatnonzero(per_field.any(1) & ~per_field.all(1))
    if len(split):
        f = int(split[0])
        raise PassError(
            f"keeping channels {np.flatnonzero(per_field[f]).tolist()} of field {f} (channels "
            f"{f * entry.field_size}..{(f + 1) * entry.field_size - 1}) of layer {layer!r} splits "
            f"the field ({len(split)} field(s) split): a field of {entry.field_size} channels is "
            "removed whole or not at all"
        )
    return np.flatnonzero(per_field.all(1))


# ---------------------------------------------------------------------------------------------- training


def can_symmetrize(gm: nn.Module) -> bool:
    """True when `gm` declares C4 with regular (size 4) or trivial (size 1) fields: `symmetrize_` applies."""
    layout = getattr(gm, "meta", {}).get(LAYOUT_META) or []
    sizes = {s for f in layout for s in (f.field_size, f.in_field_size)}
    return getattr(gm, "meta", {}).get(GROUP_META) == "C4" and bool(layout) and sizes <= {1, 4}


def _field_mean(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.reshape(-1, size).mean(1, keepdim=True).expand(-1, size).reshape(t.shape)


@torch.no_grad()
def symmetrize_(gm: fx.GraphModule) -> None:
    """Project the layout convs (and the BatchNorms right after them) of a C4 model onto the equivariant
    subspace, in place: the Reynolds average W <- 1/4 sum_r P_out^r rot90(W, r) P_in^-r over the group
    (Weiler & Cesa 2019, Sec. 2: equivariant kernels are the fixed points of the group action), where P
    shifts the 4 channels of each regular field by one; BN affine terms become the mean over each field's
    channels and the running statistics those of the field's pooled activations (`pool_field_statistics_`;
    InnerBatchNorm shares them). An e2cnn export is a fixed point (to fp32 rounding); after a gradient step
    on the plain twin it restores exact invariance. Only for models for which `can_symmetrize` is True; the
    caller owns `gm` (finetune's copy)."""
    modules = dict(gm.named_modules())
    for f in gm.meta.get(LAYOUT_META, []):
        conv = modules.get(f.layer)
        if conv is None:
            continue
        w = conv.weight
        co, ci = w.shape[:2]
        acc = torch.zeros_like(w)
        for r in range(4):
            wr = torch.rot90(w, r, (2, 3)).reshape(co // f.field_size, f.field_size, ci, *w.shape[2:])
            wr = wr.roll(r, 1).reshape(co, ci, *w.shape[2:]) if f.field_size > 1 else wr.reshape(w.shape)
            if f.in_field_size > 1:
                wr = wr.reshape(co, ci // 4, 4, *w.shape[2:]).roll(r, 2).reshape(w.shape)
            acc += wr
        w.copy_(acc / 4)
        if conv.bias is not None and f.field_size > 1:
            conv.bias.copy_(_field_mean(conv.bias, f.field_size))
    for bn, size in _field_batchnorms(gm):
        for t in (bn.weight, bn.bias):
            if t is not None:
                t.copy_(_field_mean(t, size))
    pool_field_statistics_(gm)


@torch.no_grad()
def pool_field_statistics_(gm: fx.GraphModule) -> None:
    """In place: each BatchNorm after a layout conv gets, for every regular field, the running statistics of
    the field's pooled activations (InnerBatchNorm's): the mean of its channels' means, and the mean of
    their variances plus the spread of their means (equal sample counts per channel). Weights untouched."""
    for bn, size in _field_batchnorms(gm):
        if bn.running_mean is None or bn.running_var is None:
            continue
        spread = (bn.running_mean - _field_mean(bn.running_mean, size)).pow(2)
        bn.running_var.copy_(_field_mean(bn.running_var + spread, size))
        bn.running_mean.copy_(_field_mean(bn.running_mean, size))


def _field_batchnorms(gm: fx.GraphModule) -> Iterator[tuple[nn.modules.batchnorm._BatchNorm, int]]:
    """(BatchNorm, field size) for each BatchNorm fed directly by a layout conv with fields larger than 1."""
    sizes = {f.layer: f.field_size for f in gm.meta.get(LAYOUT_META, []) if f.field_size > 1}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and src.target in sizes:
            bn = modules[node.target]
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                yield bn, sizes[src.target]


# ---------------------------------------------------------------------------------------------- registration
class _E2cnnTracing:
    """The trace adapter of e2cnn models (fxslim.trace.TraceAdapter)."""

    def claims(self, model: nn.Module) -> bool:
        return is_e2cnn_model(model)

    def meta(self, model: nn.Module) -> dict:
        return model_meta(model)

    def prepare(self, root: nn.Module) -> tuple[nn.Module, dict[int, object]]:
        return plain_root(root)

    def tracing(self):
        return geometric_tracing()

    def unwrap(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return unwrap_args(args, kwargs)

    def wrap(self, out, info):
        return wrap_output(out, info)


def _group_max_pool_rule(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    """e2cnn GroupPooling (max over each field's `group_size` channels): a field is one channel, and output
    channel f is input field f. The module reshapes with -1, so removing whole fields needs no update."""
    x = deps.ids(node.args[0])
    if x is None or len(x) < 2 or len(x[1]) % mod.group_size:
        return None
    fields = x[1].reshape(-1, mod.group_size)
    deps.unify(fields, np.broadcast_to(fields[:, :1], fields.shape))
    return [x[0], fields[:, 0].copy(), *x[2:]]


class _RotationSymmetry:
    """The symmetry handler of the cyclic and dihedral groups e2cnn declares (fxslim.symmetry)."""

    def claims(self, group: str) -> bool:
        return re.fullmatch(r"[CD]\d+", group) is not None

    def rotations(self, group: str) -> list[int]:
        return rotations(group)

    def refresh_layout(self, gm: nn.Module, layout: list) -> list:
        return current_layout(gm, layout)

    def can_project(self, gm: nn.Module) -> bool:
        return can_symmetrize(gm)

    def project_(self, gm: nn.Module) -> None:
        symmetrize_(gm)

    def pool_statistics_(self, gm: nn.Module) -> None:
        pool_field_statistics_(gm)


register_trace_adapter(_E2cnnTracing())
register_symmetry(_RotationSymmetry())
register_op(GroupMaxPool, rule=_group_max_pool_rule, leaf=True)
