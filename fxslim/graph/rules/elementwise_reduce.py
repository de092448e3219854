"""Channel rules of ops that keep their input's layout or drop whole dims: elementwise and broadcast ops,
activations, size reads, reductions, pooling and resizing. None of them creates a channel space or touches a
parameter, so none needs an update."""

from __future__ import annotations

from torch import fx, nn

from fxslim.graph.rules.base import FIXED, CoupleFn, DepsBuilder, Ids, call_arg, norm_dim


def _tensor_inputs(deps: DepsBuilder, node: fx.Node) -> list[Ids]:
    return [deps.ids(a) for a in node.all_input_nodes if deps.is_tensor(a)]


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
    dims = call_arg(node, 1, "dim", node.kwargs.get("axis"))
    keep = call_arg(node, 2, "keepdim", False)
    rank = len(x)
    if dims is None:
        return []
    dims = {norm_dim(d, rank) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
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
