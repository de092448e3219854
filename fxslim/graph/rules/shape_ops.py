"""Channel rules of ops that move indices without computing on them: cat/stack, split/chunk, permute/transpose,
view/reshape/flatten/unflatten/squeeze/unsqueeze, expand and indexing. Output ids *are* input ids (sliced,
concatenated, permuted, regrouped): no new channel spaces. Their updates rewrite the node's size, split and
slice arguments (sizes.py holds the size-argument part)."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from fxslim.graph.rules.base import FIXED, DepsBuilder, Ids, PlanApplier, call_arg, norm_dim
from fxslim.graph.rules.elementwise_reduce import no_tensor
from fxslim.graph.rules.sizes import new_size_args, update_size_args


def concat(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    xs = [deps.ids(a) for a in node.args[0]]
    if any(x is None for x in xs):
        return None
    rank = len(xs[0])
    d = norm_dim(call_arg(node, 1, "dim", 0), rank)
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
    d = norm_dim(call_arg(node, 1, "dim", 0), len(xs[0]) + 1)
    out = list(xs[0])
    out.insert(d, deps.fresh_dim(len(xs), FIXED))
    return out


def split(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> tuple[Ids, ...] | None:
    """split/chunk/tensor_split: output k holds a contiguous slice of the input's indices along `dim`."""
    x = deps.ids(node.args[0])
    shapes = deps.shapes(node)
    if x is None or shapes is None:
        return None
    d = norm_dim(call_arg(node, 2, "dim", 0), len(x))
    outs, start = [], 0
    for s in shapes:
        n = s[d]
        outs.append([x[k] if k != d else x[d][start : start + n] for k in range(len(x))])
        start += n
    return tuple(outs)


def split_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Rewrite chunk/split with the new per-output sizes (removed channels may be uneven)."""
    d = norm_dim(call_arg(node, 2, "dim", 0), len(applier.new_shapes(node.args[0])))
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
        d0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        dims = call_arg(node, 1, "dims")
        if len(node.args) > 2 or isinstance(dims, int):
            dims = node.args[1:]
        order = [norm_dim(d, rank) for d in dims]
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


def reshape_update(applier: PlanApplier, node: fx.Node, mod: nn.Module | None) -> None:
    """Give view/reshape/unflatten the new sizes of the dims that changed."""
    if mod is not None:  # nn.Unflatten
        if isinstance(mod, nn.Unflatten):
            d = norm_dim(mod.dim, len(applier.new_shapes(node.args[0])))
            mod.unflattened_size = tuple(applier.new_shapes(node)[d : d + len(mod.unflattened_size)])
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("view", "reshape"):
        update_size_args(applier, node)
    elif name == "unflatten":
        d = norm_dim(call_arg(node, 1, "dim"), len(applier.new_shapes(node.args[0])))
        sizes = list(call_arg(node, 2, "sizes"))
        old = node.meta["tensor_meta"].shape[d : d + len(sizes)]
        new = new_size_args(applier, sizes, old, applier.new_shapes(node)[d : d + len(sizes)])
        node.args = (node.args[0], call_arg(node, 1, "dim"), tuple(new))
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
    update_size_args(applier, node)


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


def gather_rows(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """`table[index]` with an integer index tensor: rows are picked (dim 0 frozen), other dims pass."""
    x, idx = deps.ids(node.args[0]), deps.ids(node.args[1])
    shape = deps.shape(node)
    if x is None or idx is None or shape is None:
        return None
    deps.freeze(x[0], f"{node.name}: rows picked by an index tensor")
    return [deps.fresh_dim(s, FIXED) for s in shape[: len(idx)]] + list(x[1:])
