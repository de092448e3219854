"""The per-op channel rules: ONE table mapping an op (module type, function or method name) to a `Rule`.

A rule's `couple(deps, node, mod)` states how the op maps the channel indices of its inputs to those of its
output, through the dependency builder `deps` (a `DepsBuilder`; deps.py builds it): `deps.unify` ties
indices that must be removed together, `deps.fresh_dim` makes new indices (CHANNEL: a new prunable channel
space such as a conv's output; FIXED: never prunable, e.g. spatial positions), `deps.param` ties a
parameter's dims to channel indices (the rewriter slices or merges those dims). It returns the id arrays of
the output (one per dim; a tuple of them for tuple outputs), False for an op that only reads sizes, or None
when the op cannot be handled, which freezes everything it touches. A rule's optional
`update(applier, node, mod)` fixes module attributes / node arguments after channels changed, through the
plan applier `applier` (a `PlanApplier`; rewrite.py builds it). Every rule function takes its context first,
then the node, then the called module (None for functions and methods). Adding an op is adding a row. This
file must never guess: an op without a row is frozen, not assumed elementwise."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.e2cnn_adapter import GroupMaxPool
from fxslim.modules import ChannelAffine, SlimMultiheadAttention, slim_window_attention

if TYPE_CHECKING:
    from fxslim.rewrite import ChannelPlan

FIXED, CHANNEL, SLICE = 0, 1, 2  # kinds of index: never prunable / a prunable channel / a parameter dim

Ids = list  # one int64 numpy array of index ids per tensor dim


class DepsBuilder(Protocol):
    """What a rule's `couple` may ask of the dependency builder (`fxslim.graph.deps.Builder`) while the graph is
    walked once in topological order. Values are fx nodes; their ids are those recorded so far."""

    def fresh_dim(self, size: int, kind: int) -> np.ndarray:
        """`size` new ids of one kind: CHANNEL (a new prunable channel space) or FIXED (never prunable)."""

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Index a[i] and index b[i] are removed together (the arrays broadcast)."""

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        """These indices are never removed, for `reason` (shown in `Group.reason`)."""

    def freeze_value(self, value: object, reason: str) -> None:
        """Freeze every dim of a node's value (or of a list / tuple of id arrays)."""

    def mark_summed(self, value: object, dim: int) -> None:
        """`value`'s dim `dim` is contracted: a parameter's such dim is consumer columns (summed on a merge)."""

    def may_prune(self, ids: np.ndarray) -> bool:
        """Whether any of these indices is a channel or a parameter dim (not FIXED)."""

    def raw(self, arg: object) -> Ids | tuple | None:
        """The recorded value of a node: a list of id arrays (a tensor), a tuple of those, or None."""

    def ids(self, arg: object) -> Ids | None:
        """The id arrays of a tensor node, one per dim (None for anything else)."""

    def is_tensor(self, arg: object) -> bool:
        """Whether `arg` is a node whose value is one tensor."""

    def shape(self, node: object) -> tuple | None:
        """The node's output shape from shape propagation (None unless it is one tensor)."""

    def shapes(self, node: fx.Node) -> list | None:
        """The shapes of a node's tuple output (None unless it is a tuple)."""

    def param(self, node: fx.Node, attr: str, kinds: list, roles: list, like: list | None = None) -> list:
        """The ids of the dims of parameter `attr` of the module `node` calls: new ids of `kinds`, or `like`'s
        ids where given; `roles` say how a merge combines each dim ("out", "in", "norm", "param")."""


class PlanApplier(Protocol):
    """What a rule's `update` may ask while a `ChannelPlan` is applied (`fxslim.rewrite._Applier`): the ids are
    those of the analysed graph, `gm` is the new module whose nodes and submodules the update edits."""

    plan: ChannelPlan
    gm: fx.GraphModule
    sizes: dict[fx.Node, tuple[bool, bool]]  # `reads_changed_size`'s answers, kept for the whole plan

    def ids(self, node: object) -> Ids | None:
        """The id arrays the node's value had when the graph was analysed."""

    def new_size(self, ids: np.ndarray) -> int:
        """The size of a dim with these ids once the plan is applied."""

    def new_shapes(self, node: object) -> list | None:
        """The node's planned shape (a list of shapes for a tuple output)."""

    def kept_positions(self, ids: np.ndarray) -> np.ndarray:
        """A bool mask over a dim's positions: those the plan keeps as they are."""


CoupleFn = Callable[[DepsBuilder, fx.Node, nn.Module | None], Ids | tuple | bool | None]
UpdateFn = Callable[[PlanApplier, fx.Node, nn.Module | None], None]


@dataclass(frozen=True)
class Rule:
    """One op's row. `couple(deps, node, mod)` ties the op's channel indices while the graph is analysed;
    `update(applier, node, mod)`, when there is one, fixes module attributes and node arguments once a plan
    changed channels."""

    couple: CoupleFn
    update: UpdateFn | None = None


# ---------------------------------------------------------------------------------------------- helpers


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _tensor_inputs(deps: DepsBuilder, node: fx.Node) -> list[Ids]:
    return [deps.ids(a) for a in node.all_input_nodes if deps.is_tensor(a)]


# ---------------------------------------------------------------------------------------------- couplings


def elementwise(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """Same-shape (broadcast) ops: index i of every full-size input dim is the same channel."""
    out_shape = deps.shape(node)
    if out_shape is None:
        return None
    ins = [ids for ids in _tensor_inputs(deps, node) if ids is not None]
    if not ins:
        return None
    out = []
    rank = len(out_shape)
    for d in range(rank):
        aligned = [x[len(x) - rank + d] for x in ins if len(x) - rank + d >= 0]
        full = [ids for ids in aligned if len(ids) == out_shape[d]]
        if not full:
            out.append(deps.fresh_dim(out_shape[d], FIXED))
            continue
        for other in full[1:]:
            deps.unify(full[0], other)
        out.append(full[0])
    return out


def passthrough(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """Ops that return their first input's layout unchanged (activations, dropout, contiguous, ...)."""
    x = deps.ids(node.args[0]) if node.args else None
    if x is None or deps.shape(node) is None or [len(a) for a in x] != list(deps.shape(node)):
        return None
    return list(x)


def no_tensor(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> bool | None:
    """Ops that only read sizes (x.size(), x.dim(), x.shape): a pruned tensor reports its new size."""
    return False if deps.shape(node) is None and deps.shapes(node) is None else None


def reduce_dims(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    x = deps.ids(node.args[0])
    dims = _arg(node, 1, "dim", node.kwargs.get("axis"))
    keep = _arg(node, 2, "keepdim", False)
    rank = len(x)
    if dims is None:
        return []
    dims = {_norm_dim(d, rank) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    out = []
    for d in range(rank):
        if d not in dims:
            out.append(x[d])
        elif keep:
            out.append(deps.fresh_dim(1, FIXED))
    return out


def spatial(nd: int | None) -> CoupleFn:
    """Pooling/resizing over the last `nd` dims (None: every dim after batch and channel): leading dims
    pass, spatial dims are new (the input's spatial dims are frozen: they are never channels)."""

    def rule(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
        x = deps.ids(node.args[0])
        shape = deps.shape(node)
        k = len(x) - 2 if nd is None and x is not None else nd
        if x is None or shape is None or len(shape) != len(x) or k is None or k < 1 or len(x) <= k:
            return None
        for ids in x[-k:]:
            deps.freeze(ids, f"{node.name}: pooled or resized dim")
        return list(x[:-k]) + [deps.fresh_dim(s, FIXED) for s in shape[-k:]]

    return rule


def concat(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    xs = [deps.ids(a) for a in node.args[0]]
    if any(x is None for x in xs):
        return None
    rank = len(xs[0])
    d = _norm_dim(_arg(node, 1, "dim", 0), rank)
    out = []
    for k in range(rank):
        if k == d:
            out.append(np.concatenate([x[k] for x in xs]))
        else:
            for x in xs[1:]:
                deps.unify(xs[0][k], x[k])
            out.append(xs[0][k])
    return out


def stack(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    xs = [deps.ids(a) for a in node.args[0]]
    if any(x is None for x in xs):
        return None
    for x in xs[1:]:
        for k in range(len(x)):
            deps.unify(xs[0][k], x[k])
    d = _norm_dim(_arg(node, 1, "dim", 0), len(xs[0]) + 1)
    out = list(xs[0])
    out.insert(d, deps.fresh_dim(len(xs), FIXED))
    return out


def split(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> tuple[Ids, ...] | None:
    """split/chunk/tensor_split: output k holds a contiguous slice of the input's indices along `dim`."""
    x = deps.ids(node.args[0])
    shapes = deps.shapes(node)
    if x is None or shapes is None:
        return None
    d = _norm_dim(_arg(node, 2, "dim", 0), len(x))
    outs, start = [], 0
    for s in shapes:
        n = s[d]
        outs.append([x[k] if k != d else x[d][start : start + n] for k in range(len(x))])
        start += n
    return tuple(outs)


def split_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Rewrite chunk/split with the new per-output sizes (removed channels may be uneven)."""
    d = _norm_dim(_arg(node, 2, "dim", 0), len(applier.new_shapes(node.args[0])))
    sizes = [s[d] for s in applier.new_shapes(node)]
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes), {"dim": d}


def permute(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    x = deps.ids(node.args[0])
    if x is None:
        return None
    rank = len(x)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        dims = _arg(node, 1, "dims")
        if len(node.args) > 2 or isinstance(dims, int):
            dims = node.args[1:]
        order = [_norm_dim(d, rank) for d in dims]
    return [x[i] for i in order]


def _reshape_blocks(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims that hold the same elements (equal products)."""
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        ii, jj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    return None
                ii.append(i)
                pi *= src[i]
                i += 1
            else:
                if j >= len(dst):
                    return None
                jj.append(j)
                pj *= dst[j]
                j += 1
        blocks.append((ii, jj))
    return blocks


def reshape(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze, from the input and output shapes.

    Merging dims (flatten C×H×W → F): index f belongs to the channel of its one prunable factor (the
    carrier); the other factors are frozen. Splitting a dim (E → heads×dim, C → groups×C/g): one output
    dim carries the channels (heads when the split ends the shape, else the largest part), indices that
    differ only in the other parts become one channel, and the other output dims are new and frozen."""
    x = deps.ids(node.args[0])
    src, dst = deps.shape(node.args[0]), deps.shape(node)
    if x is None or src is None or dst is None:
        return None
    blocks = _reshape_blocks(tuple(src), tuple(dst))
    if blocks is None:
        return None
    out: list = [None] * len(dst)
    for ii, jj in blocks:
        if not jj:
            deps.freeze(x[ii[0]], f"{node.name}: reshape drops this dim")
        elif not ii:
            out[jj[0]] = deps.fresh_dim(1, FIXED)
        elif len(ii) == 1 and len(jj) == 1:
            out[jj[0]] = x[ii[0]]
        elif len(jj) == 1:
            out[jj[0]] = _merge(deps, node, [x[i] for i in ii])
        elif len(ii) == 1:
            trailing = jj[-1] == len(dst) - 1
            for j, ids in zip(jj, _split(deps, x[ii[0]], [dst[j] for j in jj], trailing), strict=True):
                out[j] = ids
        else:
            for i in ii:
                deps.freeze(x[i], f"{node.name}: reshape regroups dims {ii} -> {jj}")
            for j in jj:
                out[j] = deps.fresh_dim(dst[j], FIXED)
    return out


def _merge(deps: DepsBuilder, node: fx.Node, factors: list[np.ndarray]) -> np.ndarray:
    sizes = [len(f) for f in factors]
    live = [k for k, f in enumerate(factors) if len(f) > 1]
    if len(live) <= 1:
        carrier = live[0] if live else 0
    else:
        prunable = [k for k in live if deps.may_prune(factors[k])]
        if not prunable:
            return deps.fresh_dim(int(np.prod(sizes)), FIXED)
        carrier = max(prunable, key=lambda k: (sizes[k], -k))
        for k in live:
            if k != carrier:
                deps.freeze(factors[k], f"{node.name}: flattened together with a pruned dim")
    shape = [1] * len(sizes)
    shape[carrier] = sizes[carrier]
    return np.broadcast_to(factors[carrier].reshape(shape), sizes).reshape(-1)


def _split(deps: DepsBuilder, ids: np.ndarray, sizes: list[int], trailing: bool) -> list[np.ndarray]:
    live = [k for k, s in enumerate(sizes) if s > 1]
    if len(live) <= 1:
        return [ids if (k in live or (not live and k == 0)) else deps.fresh_dim(s, FIXED) for k, s in enumerate(sizes)]
    # A split that ends the shape is a feature dim cut into heads (..., heads, head_dim): a head is the unit.
    # Otherwise (channel shuffle: N, groups, C/groups, H, W) the largest part keeps fine-grained channels.
    carrier = live[0] if trailing else max(live, key=lambda k: (sizes[k], -k))  # ties: the outer part
    grid = np.moveaxis(ids.reshape(sizes), carrier, -1).reshape(-1, sizes[carrier])
    deps.unify(grid, np.broadcast_to(grid[:1], grid.shape))
    return [grid[0] if k == carrier else deps.fresh_dim(s, FIXED) for k, s in enumerate(sizes)]


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


def _update_sizes(applier: PlanApplier, node: fx.Node) -> None:
    """Give view/reshape/expand's size arguments the new sizes of the dims the plan changes."""
    sizes, wrapped = _shape_args(node)
    old, new = node.meta["tensor_meta"].shape, applier.new_shapes(node)
    if len(sizes) != len(old):  # one computed shape object (e.g. `y.shape`): read at run time, left alone
        return
    _set_shape_args(node, _new_size_args(applier, sizes, old, new), wrapped)


def _new_size_args(applier: PlanApplier, sizes: list, old, new) -> list:
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


def reshape_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Give view/reshape/unflatten the new sizes of the dims that changed."""
    if mod is not None:  # nn.Unflatten
        if isinstance(mod, nn.Unflatten):
            d = _norm_dim(mod.dim, len(applier.new_shapes(node.args[0])))
            mod.unflattened_size = tuple(applier.new_shapes(node)[d : d + len(mod.unflattened_size)])
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("view", "reshape"):
        _update_sizes(applier, node)
    elif name == "unflatten":
        d = _norm_dim(_arg(node, 1, "dim"), len(applier.new_shapes(node.args[0])))
        sizes = list(_arg(node, 2, "sizes"))
        old = node.meta["tensor_meta"].shape[d : d + len(sizes)]
        new = _new_size_args(applier, sizes, old, applier.new_shapes(node)[d : d + len(sizes)])
        node.args = (node.args[0], _arg(node, 1, "dim"), tuple(new))
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dim", "sizes")}


def expand(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    x = deps.ids(node.args[0])
    shape = deps.shape(node)
    if x is None or shape is None:
        return None
    lead = len(shape) - len(x)
    out = [deps.fresh_dim(s, FIXED) for s in shape[:lead]]
    for d, ids in enumerate(x):
        out.append(ids if len(ids) == shape[lead + d] else deps.fresh_dim(shape[lead + d], FIXED))
    return out


def expand_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    _update_sizes(applier, node)


SIZE_UPDATES = (reshape_update, expand_update)  # updates that rewrite size arguments (`_update_sizes`)


def getitem(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | tuple | bool | None:
    base = node.args[0]
    if isinstance(deps.raw(base), tuple):  # element of a tuple output (split, attention, ...)
        if not isinstance(node.args[1], int):
            return None
        item = deps.raw(base)[node.args[1]]
        return item if item is not None else no_tensor(deps, node)
    x = deps.ids(base)
    if x is None:
        return no_tensor(deps, node)
    if isinstance(node.args[1], fx.Node) and deps.is_tensor(node.args[1]):
        meta = node.args[1].meta.get("tensor_meta")
        return None if getattr(meta, "dtype", None) == torch.bool else gather_rows(deps, node)
    expanded = _expand_index(node.args[1], len(x))
    if expanded is None:
        return None
    out, d = [], 0
    for i in expanded:
        if i is None:
            out.append(deps.fresh_dim(1, FIXED))
            continue
        if isinstance(i, int):
            deps.freeze(x[d], f"{node.name}: integer index into this dim")
        elif i.step not in (None, 1):
            deps.freeze(x[d], f"{node.name}: strided slice")
            out.append(deps.fresh_dim(len(x[d][i]), FIXED))
        else:
            out.append(x[d][i])
        d += 1
    return out


def _expand_index(index, rank: int) -> list | None:
    """A tensor index as one entry per input dim (None entries add a dim); None when unsupported."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        expanded += [slice(None)] * (rank - n_real) if i is Ellipsis else [i]
    return expanded + [slice(None)] * (rank - sum(1 for i in expanded if i is not None))


def getitem_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Move slice bounds to the new positions: a bound counts the kept indices before it."""
    x = applier.ids(node.args[0])
    if x is None or isinstance(node.args[1], fx.Node):
        return
    expanded = _expand_index(node.args[1], len(x))
    if expanded is None:
        return
    new, d = [], 0
    for i in expanded:
        if isinstance(i, slice) and (i.start is not None or i.stop is not None):
            kept = applier.kept_positions(x[d])
            n = len(x[d])
            start = None if i.start is None else int(np.count_nonzero(kept[: slice(i.start, None).indices(n)[0]]))
            stop = None if i.stop is None else int(np.count_nonzero(kept[: slice(None, i.stop).indices(n)[1]]))
            new.append(slice(start, stop, i.step))
        else:
            new.append(i)
        if i is not None:
            d += 1
    original = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if Ellipsis not in original:  # keep the user's form: no padding slices, a bare index stays bare
        new = new[: len(original)]
        node.args = (node.args[0], tuple(new) if isinstance(node.args[1], tuple) else new[0])
    else:
        node.args = (node.args[0], tuple(new))


def matmul(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    a, c = deps.ids(node.args[0]), deps.ids(node.args[1])
    shape = deps.shape(node)
    if a is None or c is None or len(a) < 2 or len(c) < 2 or shape is None:
        return None
    deps.unify(a[-1], c[-2])
    deps.mark_summed(node.args[0], len(a) - 1)  # a parameter operand's contracted dim is consumer columns
    deps.mark_summed(node.args[1], len(c) - 2)
    batch = _broadcast(deps, a[:-2], c[:-2], shape[:-2])
    return batch + [a[-2], c[-1]]


def _broadcast(deps: DepsBuilder, xa: Ids, xc: Ids, shape) -> Ids:
    """The batch dims of a broadcast between two operands: full-size dims of both are tied."""
    out = []
    for d in range(len(shape)):
        cands = [x[len(x) - len(shape) + d] for x in (xa, xc) if len(x) - len(shape) + d >= 0]
        cands = [c for c in cands if len(c) == shape[d]]
        for c in cands[1:]:
            deps.unify(cands[0], c)
        out.append(cands[0] if cands else deps.fresh_dim(shape[d], FIXED))
    return out


def sdpa(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    q, k, v = (deps.ids(_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
    shape = deps.shape(node)
    if q is None or k is None or v is None or shape is None:
        return None
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        deps.freeze_value(mask, f"{node.name}: attention mask")
    deps.unify(q[-1], k[-1])
    deps.unify(k[-2], v[-2])
    batch = _broadcast(deps, q[:-2], k[:-2], shape[:-2])
    _broadcast(deps, batch, v[:-2], shape[:-2])
    return batch + [q[-2], v[-1]]


def einsum(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """torch.einsum: every occurrence of one subscript letter is the same index (contracted letters too)."""
    eq = node.args[0]
    operands = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return None
    lhs, out_letters = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    xs = [deps.ids(o) for o in operands]
    if len(terms) != len(xs) or any(x is None or len(x) != len(t) for x, t in zip(xs, terms, strict=False)):
        return None
    seen: dict[str, np.ndarray] = {}
    for term, x, operand in zip(terms, xs, operands, strict=True):
        for d, (letter, ids) in enumerate(zip(term, x, strict=True)):
            if letter not in out_letters:
                deps.mark_summed(operand, d)
            if letter not in seen or len(seen[letter]) == 1:
                seen[letter] = ids
            elif len(ids) == len(seen[letter]):
                deps.unify(seen[letter], ids)
    return [seen[letter] for letter in out_letters]


def gather_rows(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """`table[index]` with an integer index tensor: rows are picked (dim 0 frozen), other dims pass."""
    x, idx = deps.ids(node.args[0]), deps.ids(node.args[1])
    shape = deps.shape(node)
    if x is None or idx is None or shape is None:
        return None
    deps.freeze(x[0], f"{node.name}: rows picked by an index tensor")
    return [deps.fresh_dim(s, FIXED) for s in shape[: len(idx)]] + list(x[1:])


# ---------------------------------------------------------------------------------------------- modules


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
    k = len(_arg(node, 1, "normalized_shape"))
    for i, name in ((2, "weight"), (3, "bias")):
        p = _arg(node, i, name)
        if isinstance(p, fx.Node):
            ids = deps.ids(p)
            if ids is None or len(ids) != k:
                return None
            for d in range(k):
                deps.unify(x[len(x) - k + d], ids[d])
    return list(x)


def layernorm_fn_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    k = len(_arg(node, 1, "normalized_shape"))
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


def _attention_inputs(node: fx.Node) -> list:
    return [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]


def _freeze_attention(deps: DepsBuilder, node: fx.Node, reason: str) -> tuple:
    q = deps.ids(_arg(node, 0, "query"))
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


def channel_affine(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    """ChannelAffine: channels pass; its scale and shift buffers are sliced with the channel dim."""
    x = deps.ids(node.args[0])
    if x is None:
        return None
    d = _norm_dim(mod.dim, len(x))
    for attr in ("scale", "shift"):
        deps.param(node, attr, [SLICE], ["param"], like=[x[d]])
    return list(x)


def group_max_pool(deps: DepsBuilder, node: fx.Node, mod: nn.Module) -> Ids | None:
    """e2cnn GroupPooling (max over each field's `group_size` channels): a field is one channel, and output
    channel f is input field f. The module reshapes with -1, so removing whole fields needs no update."""
    x = deps.ids(node.args[0])
    if x is None or len(x) < 2 or len(x[1]) % mod.group_size:
        return None
    fields = x[1].reshape(-1, mod.group_size)
    deps.unify(fields, np.broadcast_to(fields[:, :1], fields.shape))
    return [x[0], fields[:, 0].copy(), *x[2:]]


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


# ---------------------------------------------------------------------------------------------- the table


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
    nn.Unflatten: Rule(reshape, reshape_update),
    nn.MultiheadAttention: Rule(multihead_attention, multihead_attention_update),
    SlimMultiheadAttention: Rule(multihead_attention, multihead_attention_update),
    GroupMaxPool: Rule(group_max_pool),
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
    torch.reshape: Rule(reshape, reshape_update),
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
    "view": Rule(reshape, reshape_update),
    "reshape": Rule(reshape, reshape_update),
    "flatten": Rule(reshape),
    "unflatten": Rule(reshape, reshape_update),
    "squeeze": Rule(reshape),
    "unsqueeze": Rule(reshape),
    "permute": Rule(permute),
    "transpose": Rule(permute),
    "swapaxes": Rule(permute),
    "swapdims": Rule(permute),
    "chunk": Rule(split, split_update),
    "split": Rule(split, split_update),
    "expand": Rule(expand, expand_update),
    "size": Rule(no_tensor),
    "dim": Rule(no_tensor),
    "matmul": Rule(matmul),
    "bmm": Rule(matmul),
}


def register_function_rule(fn: object, rule: Rule) -> None:
    """Give a function that torch.fx keeps as a call (e.g. one passed to `torch.fx.wrap`) its rule."""
    FUNCTION_RULES[fn] = rule


def register_module_rule(module_type: type, rule: Rule) -> None:
    """Give a leaf module type its channel rule."""
    MODULE_RULES[module_type] = rule


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
