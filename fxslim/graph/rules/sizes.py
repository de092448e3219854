"""Size arguments of view/reshape/unflatten/expand after a rewrite: literal sizes of the dims a plan resizes get
their new sizes, and a size computed at run time is recognised when it reads only pure channel dims
(`C // heads`), so it can be replaced where it feeds a dim it no longer matches. Only the rewrite side
(`PlanApplier`) calls these; nothing here couples channels."""

from __future__ import annotations

import operator

import numpy as np
from torch import fx

from fxslim.graph.rules.base import PlanApplier


def _resized(sizes, old, new) -> list:
    """Size arguments with every dim whose size changed replaced by its new size. A computed size (a Node,
    e.g. `x.shape[2]`) of a changed dim is replaced too: it was read from a tensor that pruning did not
    touch, and channel dims are static. -1 stays -1."""
    return [s if (s == -1 or o == n) else n for s, o, n in zip(sizes, old, new, strict=True)]


def _shape_args(node: fx.Node) -> tuple[list, bool]:
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1]), True
    return list(node.args[1:]), False


def _set_shape_args(node: fx.Node, sizes: list, wrapped: bool) -> None:
    node.args = (node.args[0], tuple(sizes)) if wrapped else (node.args[0], *sizes)


def update_size_args(applier: PlanApplier, node: fx.Node) -> None:
    """Give view/reshape/expand's size arguments the new sizes of the dims the plan changes."""
    sizes, wrapped = _shape_args(node)
    old, new = node.meta["tensor_meta"].shape, applier.new_shapes(node)
    if len(sizes) != len(old):  # one computed shape object (e.g. `y.shape`): read at run time, left alone
        return
    _set_shape_args(node, new_size_args(applier, sizes, old, new), wrapped)


def new_size_args(applier: PlanApplier, sizes: list, old, new) -> list:
    """`_resized`, and a size computed from a dim the plan changes, given to a dim it does not (MaxViT merges
    its heads back with `reshape(B, G, P, D)`, D from its input's shape: the input's width can shrink while
    the heads stay), becomes the dim's size: it would be read anew at run time."""
    resized = _resized(sizes, old, new)
    return [n if reads_changed_size(applier, s) else s for s, n in zip(resized, new, strict=True)]


def reads_changed_size(applier: PlanApplier, arg: object) -> bool:
    """Whether `arg` is a number computed at run time only from integers and sizes of pure channel dims (each
    position one channel of a group; not a flatten of channels with batch or space, whose size can change at
    run time), at least one of which the plan resizes: `t.shape[j]`, `t.size()[j]`, `t.size(j)`, and `+ - * //`
    of those (`C // heads`). The answers are kept in `applier.sizes` for the rest of the plan's application."""
    return isinstance(arg, fx.Node) and _channel_size(applier, arg, applier.sizes) == (True, True)


_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub)


def _channel_size(applier: PlanApplier, arg: object, memo: dict, depth: int = 0) -> tuple[bool, bool]:
    """(static, resized) of a size argument: static when it is computed only from integers and sizes read from
    pure channel dims; resized when one of those sizes changes under the plan."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return True, False
    if not isinstance(arg, fx.Node) or depth > 16:
        return False, False
    if arg not in memo:
        memo[arg] = _channel_size_of_node(applier, arg, memo, depth)
    return memo[arg]


def _channel_size_of_node(applier: PlanApplier, arg: fx.Node, memo: dict, depth: int) -> tuple[bool, bool]:
    if arg.op == "call_function" and arg.target in _SIZE_ARITHMETIC and not arg.kwargs and len(arg.args) == 2:
        parts = [_channel_size(applier, a, memo, depth + 1) for a in arg.args]
        return all(p[0] for p in parts), any(p[1] for p in parts)
    read = _size_read(arg)
    if read is None:
        return False, False
    t, j = read
    meta = t.meta.get("tensor_meta") if isinstance(t, fx.Node) else None
    ids = applier.ids(t) if hasattr(meta, "shape") else None
    if not isinstance(j, int) or ids is None or len(ids) != len(meta.shape) or not -len(ids) <= j < len(ids):
        return False, False
    dg = applier.plan.dg
    atoms = dg.label[ids[j]]
    if len(np.unique(atoms)) != len(atoms) or (dg.atom_group[atoms] < 0).any():
        return False, False
    return True, applier.new_size(ids[j]) != int(meta.shape[j])


def _size_read(arg: fx.Node) -> tuple | None:
    """(t, j) when `arg` reads `t.shape[j]`, `t.size()[j]` or `t.size(j)`."""
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) + len(arg.kwargs) == 2:
        return arg.args[0], arg.args[1] if len(arg.args) == 2 else arg.kwargs.get("dim")
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[0], fx.Node):
        src, j = arg.args
        if src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",):
            return src.args[0], j
        if src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs:
            return src.args[0], j
    return None
