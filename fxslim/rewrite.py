"""Rewrite primitives shared by every pass: remove channels, merge channels, replace a module, drop a block.

Each primitive returns a NEW GraphModule (built on a copy-on-write clone; the input is never edited), which passes
`graph.lint()`, runs, and has the shapes the plan promises (checked by shape propagation; a mismatch is a
`PassError` naming the node). Channel changes are expressed as a `ChannelPlan` over the atoms of a
`DependencyGraph`: every parameter dim tied to channels is re-indexed once (producer rows and norm
statistics averaged over a merged cluster, consumer columns summed so identical channels fuse exactly
unless a norm computes statistics across channels, e.g. LayerNorm/GroupNorm),
then the rules' `update` hooks fix module attributes and node arguments. Nothing here decides *what* to
remove: passes do."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from fxslim.errors import PassError
from fxslim.graph.clone import clone_gm
from fxslim.graph.deps import DependencyGraph, Group
from fxslim.graph.rules import reads_changed_size, rule_for
from fxslim.graph.shape import propagate
from fxslim.scratch import Scratch


class ChannelPlan:
    """Which atoms survive, and which surviving atom each merged atom folds into.

    `target[a] == a`: atom a is kept (it represents its cluster); `-1`: removed; another atom b: merged
    into b. `weight[a]` weighs atom a in the averaged (producer) dims of a merge."""

    def __init__(self, dg: DependencyGraph):
        self.dg = dg
        n = int(dg.label.max()) + 1 if len(dg.label) else 0
        self.target = np.arange(n, dtype=np.int64)
        self.weight = np.ones(n, dtype=np.float64)

    def remove(self, group: Group, keep: Sequence[int] | np.ndarray) -> ChannelPlan:
        """Keep the channels `keep` (indices or a bool mask over the group's channels); remove the rest."""
        mask = _mask(group, keep)
        if (~mask & group.frozen).any():
            raise PassError(f"cannot remove frozen channels of {group!r}")
        if not mask.any():
            raise PassError(f"removing every channel of {group!r}; keep at least one")
        self.target[group.atoms[~mask]] = -1
        return self

    def merge(self, group: Group, clusters: Sequence[Sequence[int]], weights: np.ndarray | None = None) -> ChannelPlan:
        """Fuse each cluster (channel indices of the group) into its first channel; `weights` (one per channel
        of the group) weigh the averaged dims. Channels in no cluster are kept as they are."""
        for cluster in clusters:
            idx = np.asarray(cluster, dtype=np.int64)
            if len(idx) < 2:
                continue
            if group.frozen[idx].any():
                raise PassError(f"cannot merge frozen channels {idx.tolist()} of {group!r}")
            self.target[group.atoms[idx]] = group.atoms[idx[0]]
        if weights is not None:
            self.weight[group.atoms] = np.asarray(weights, dtype=np.float64)
        return self

    # index maps ------------------------------------------------------------------------------------
    def dest(self, ids: np.ndarray) -> tuple[np.ndarray, int, bool] | None:
        """For one dim with index ids: new position of each old position (-1: gone), the new size, and
        whether the map is a plain selection. None when the dim is unchanged."""
        a = self.dg.label[ids]
        t = self.target[a]
        rep = t == a
        if rep.all():
            return None
        new_size = int(rep.sum())
        dest = np.full(len(ids), -1, dtype=np.int64)
        dest[rep] = np.arange(new_size)
        merged = (t >= 0) & ~rep
        if not merged.any():
            return dest, new_size, True
        # Pair the k-th occurrence of a merged atom with the k-th occurrence of its representative
        # (an atom occurs several times in a flattened dim: once per spatial position).
        rank = occurrence_rank(a)
        span = len(a) + 1
        rep_keys = a[rep] * span + rank[rep]
        if not len(rep_keys):
            raise PassError("a merge leaves a tensor dim with no representative channel (a cluster spans the "
                            "two sides of a split); cluster within DependencyGraph.merge_classes(group)")
        key_order = np.argsort(rep_keys)
        want = t[merged] * span + rank[merged]
        pos = np.searchsorted(rep_keys[key_order], want)
        pos = np.minimum(pos, len(rep_keys) - 1)
        if not (rep_keys[key_order][pos] == want).all():
            raise PassError("merge pairs channels that do not run through the same tensors (e.g. the two "
                            "sides of a split); cluster within DependencyGraph.merge_classes(group)")
        dest[merged] = dest[rep][key_order][pos]
        return dest, new_size, False

    def kept_positions(self, ids: np.ndarray) -> np.ndarray:
        a = self.dg.label[ids]
        return self.target[a] == a


def occurrence_rank(a: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same value (0 for the first occurrence)."""
    order = np.argsort(a, kind="stable")
    sa = a[order]
    starts = np.r_[0, np.flatnonzero(sa[1:] != sa[:-1]) + 1]
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
    return rank


def _mask(group: Group, keep) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (group.size,):
            raise PassError(f"keep mask has shape {keep.shape}, {group!r} has {group.size} channels")
        return keep
    mask = np.zeros(group.size, dtype=bool)
    if keep.size and (keep.min() < 0 or keep.max() >= group.size):
        raise PassError(f"keep indices out of range for {group!r}")
    mask[keep.astype(np.int64)] = True
    return mask


class _Applier:
    """What a rule's `update` hook may ask while the new graph is being fixed up (`rules.PlanApplier`)."""

    def __init__(self, plan: ChannelPlan, old_nodes: dict[str, fx.Node], gm: fx.GraphModule):
        self.plan = plan
        self.old = old_nodes
        self.gm = gm  # the new module, for updates that swap a submodule
        # The plan does not change while it is applied: each dim's map is computed once (dims are shared
        # arrays, a residual stream's channel ids are read by every node on it).
        self._dests: dict[int, tuple] = {}
        self.sizes: dict[fx.Node, tuple[bool, bool]] = {}  # `rules.reads_changed_size`'s answers, per size node

    def dest(self, ids: np.ndarray) -> tuple[np.ndarray, int, bool] | None:
        """`plan.dest(ids)`, memoised for this application of the plan."""
        hit = self._dests.get(id(ids))
        if hit is None or hit[0] is not ids:
            hit = self._dests[id(ids)] = (ids, self.plan.dest(ids))
        return hit[1]

    def new_size(self, ids: np.ndarray) -> int:
        d = self.dest(ids)
        return len(ids) if d is None else d[1]

    def changed(self, value) -> bool:
        """Whether any dim of a node value (list of id arrays, or a tuple of those) changes."""
        if isinstance(value, list):
            return any(self.dest(ids) is not None for ids in value)
        if isinstance(value, tuple):
            return any(self.changed(v) for v in value)
        return False

    def _old(self, node):
        return self.old.get(node.name) if isinstance(node, fx.Node) else None

    def raw(self, node):
        return self.plan.dg.values.get(self._old(node))

    def ids(self, node):
        v = self.raw(node)
        return v if isinstance(v, list) else None

    def new_shapes(self, node):
        v = self.raw(node)
        if isinstance(v, list):
            return [self.new_size(ids) for ids in v]
        if isinstance(v, tuple):
            return [None if e is None else [self.new_size(ids) for ids in e] for e in v]
        return None

    def kept_positions(self, ids: np.ndarray) -> np.ndarray:
        return self.plan.kept_positions(ids)


def _reindex(t: torch.Tensor, dim: int, dest: np.ndarray, size: int, select: bool, summed: bool,
             weights: np.ndarray, scratch: Scratch | None = None) -> torch.Tensor:
    """`t` with dim `dim` re-indexed by `dest` (kept positions, or clusters merged); the result goes into
    `scratch` when given (an intermediate the caller reads once), else into a tensor of its own."""
    src = np.flatnonzero(dest >= 0)
    src_t = torch.from_numpy(src)
    if select:
        if scratch is None:
            return t.index_select(dim, src_t)  # a new tensor already: nothing shares its storage
        shape = list(t.shape)
        shape[dim] = len(src)
        return torch.index_select(t, dim, src_t.to(t.device), out=scratch.take(shape, t))
    shape = list(t.shape)
    shape[dim] = size
    to = torch.from_numpy(dest[src])
    part = t.index_select(dim, src_t)
    if summed:  # consumer columns: y = sum_c W[:, c] x_c, so identical x_c fuse exactly
        return torch.zeros(shape, dtype=t.dtype).index_add_(dim, to, part)
    # producer rows / norm statistics: weighted mean over the cluster (FCOS Eq. 5 with weights)
    w = torch.from_numpy(weights[src]).to(t.dtype)
    view = [1] * t.dim()
    view[dim] = len(src)
    total = torch.zeros(shape, dtype=t.dtype).index_add_(dim, to, part * w.view(view))
    norm = torch.zeros(size, dtype=t.dtype).index_add_(0, to, w)
    view[dim] = size
    return total / norm.view(view)


def set_tensor(gm: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at qualified name `key` (a parameter keeps its requires_grad)."""
    owner_name, _, attr = key.rpartition(".")
    _set_on(gm.get_submodule(owner_name) if owner_name else gm, attr, value)


def apply_plan(gm: fx.GraphModule, plan: ChannelPlan) -> fx.GraphModule:
    """Return a new GraphModule with the plan's channels removed / merged, checked by shape propagation."""
    dg = plan.dg
    old_nodes = {n.name: n for n in dg.gm.graph.nodes}
    new = clone_gm(gm, compile=False)  # compiled once below, after the updates edit node arguments
    if [n.name for n in new.graph.nodes] != list(old_nodes):
        raise PassError("apply_plan: the GraphModule is not the one the DependencyGraph was built from")
    applier = _Applier(plan, old_nodes, new)
    owners = dict(new.named_modules(remove_duplicate=False))
    reindexed: set[str] = set()  # modules (qualified names) that own a re-indexed tensor
    scratch = (Scratch(), Scratch())  # intermediates of multi-dim re-indexing: reused memory
    with torch.no_grad():
        for p in dg.params:
            owner_name, _, attr = p.key.rpartition(".")
            owner = owners[owner_name]
            t = owner._parameters.get(attr)
            if t is None:
                t = owner._buffers[attr]
            moves = [(k, ids, d) for k, ids in enumerate(p.ids) if ids is not None and (d := applier.dest(ids))]
            for j, (k, ids, (dest, size, select)) in enumerate(moves):
                w = plan.weight[dg.label[ids]]
                # a step before the last writes reused memory, two buffers in turn (a step reads the one before)
                into = scratch[j % 2] if j < len(moves) - 1 else None
                t = _reindex(t.detach(), k, dest, size, select, p.roles[k] == "in", w, into)
            if moves:
                _set_on(owner, attr, t)
                reindexed.update(_prefixes(owner_name))
    resized = {n for n in new.graph.nodes if reads_changed_size(applier, n)}  # sizes of resized dims
    for node in new.graph.nodes:
        owns = node.op == "call_module" and node.target in reindexed
        touched = (node, *node.all_input_nodes)
        changed = owns or any(applier.changed(dg.values.get(old_nodes[n.name])) for n in touched)
        if not changed and not any(n in resized for n in node.all_input_nodes):
            continue
        rule, mod = rule_for(node, new)
        if rule is None or rule.update is None or not (changed or rule.rewrites_size_args):
            continue
        rule.update(applier, node, mod)
    new.graph.lint()
    new.recompile()
    verify_shapes(new, dg.example_inputs, applier)
    return new


def _prefixes(name: str) -> list[str]:
    """"a.b.c" -> ["a.b.c", "a.b", "a"]: the module and every module above it (not the root "")."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _set_on(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `attr` of `owner` (a parameter keeps its requires_grad)."""
    old = owner._parameters.get(attr)
    if old is not None:
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = value


def verify_shapes(gm: fx.GraphModule, example_inputs: tuple, applier: _Applier) -> None:
    """Run shape propagation on the rewritten graph and compare every node with the planned shape. Where
    shape propagation gives conv and linear layers stand-ins (`fxslim.graph.stand_in`), those are checked
    by their shapes (input channels against the weight, dtypes, devices), not run; every other op runs."""
    try:
        propagate(gm, example_inputs)
    except Exception as exc:
        raise PassError(f"the rewritten graph does not run: {exc}") from exc
    for node in gm.graph.nodes:
        want = applier.new_shapes(node)
        meta = node.meta.get("tensor_meta")
        if want is None or meta is None:
            continue
        got = list(meta.shape) if hasattr(meta, "shape") else [
            None if m is None or not hasattr(m, "shape") else list(m.shape) for m in meta]
        if got != want:
            raise PassError(f"rewrite gave node {node.name!r} shape {got}, the plan expects {want}")


def remove_channels(gm: fx.GraphModule, group: Group, keep) -> fx.GraphModule:
    """New module keeping only channels `keep` (indices or bool mask) of `group`."""
    return apply_plan(gm, ChannelPlan(group.dg).remove(group, keep))


def merge_channels(gm: fx.GraphModule, group: Group, clusters: Sequence[Sequence[int]], how: str = "mean",
                   weights: np.ndarray | None = None) -> fx.GraphModule:
    """New module where each cluster of `group`'s channels becomes one channel.

    how="mean": producer rows averaged; how="l1": weighted by `weights` (e.g. the rows' L1 norms)."""
    if how not in ("mean", "l1"):
        raise PassError(f"merge_channels: how={how!r}; valid: 'mean', 'l1'")
    if how == "l1" and weights is None:
        raise PassError("merge_channels: how='l1' needs weights (one per channel of the group)")
    return apply_plan(gm, ChannelPlan(group.dg).merge(group, clusters, weights if how == "l1" else None))


def replace_module(gm: fx.GraphModule, node: str, new: nn.Module | Sequence[nn.Module],
                   example_inputs: tuple | None = None, *, inline: bool = False) -> fx.GraphModule:
    """New module where the call_module node `node` runs `new` (a module, or a chain given as a list).

    inline=True splices `new`'s own traced graph in place of the node (one node per layer of a chain,
    named `<node>_<layer>`), so that cost counting, the analyzer and later passes see its layers; the
    modules live under the old module's path (`<target>.0`, `<target>.1`, ...)."""
    return replace_modules(gm, {node: new}, example_inputs, inline=inline)


def replace_modules(gm: fx.GraphModule, new: dict[str, nn.Module | Sequence[nn.Module]],
                    example_inputs: tuple | None = None, *, inline: bool = False) -> fx.GraphModule:
    """`replace_module` for several call_module nodes at once (one copy of the graph): {node name: new}."""
    out = clone_gm(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    checks = {}
    for node, module in new.items():
        target = nodes.get(node)
        if target is None or target.op != "call_module":
            raise PassError(f"replace_module: {node!r} is not a call_module node")
        before = target.meta.get("tensor_meta")
        chain = copy.deepcopy(nn.Sequential(*module) if isinstance(module, (list, tuple)) else module)
        parent, _, attr = str(target.target).rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, chain)
        if inline:
            target = _inline(out, target, chain)
        checks[target.name] = before
    out.graph.lint()
    out.recompile()
    if example_inputs is not None:
        _check_same_outputs(out, checks, example_inputs)
    return out


def _inline(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node:
    """Replace call_module `node` by the nodes of `module`'s traced graph; returns the node giving its value."""
    sub = fx.symbolic_trace(module)
    inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(node.args) or node.kwargs:
        raise PassError(f"replace_module: {node.name!r} passes {len(node.args)} positional arguments "
                        f"(and {len(node.kwargs)} keyword ones), the new module takes {len(inputs)}")
    env: dict[fx.Node, object] = dict(zip(inputs, node.args, strict=True))
    result = None
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            args = fx.map_arg(n.args, lambda a: env[a])
            if n.op == "output":
                result = args[0]
                break
            kwargs = fx.map_arg(n.kwargs, lambda a: env[a])
            tgt = f"{node.target}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            env[n] = gm.graph.create_node(n.op, tgt, args, kwargs, name=f"{node.name}_{n.name.lstrip('_')}")
    if not isinstance(result, fx.Node):
        raise PassError(f"replace_module: the module replacing {node.name!r} does not return a tensor node")
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return result


def drop_block(gm: fx.GraphModule, start: str, end: str, projection: nn.Module | None = None,
               example_inputs: tuple | None = None) -> fx.GraphModule:
    """New module where the value of node `end` is replaced by the value of node `start` (the block
    between them becomes identity), through `projection` when given (e.g. a 1×1 conv when channels
    differ). Nodes left without users are removed."""
    names = {n.name for n in gm.graph.nodes}
    if start not in names or end not in names:
        raise PassError(f"drop_block: unknown node {start if start not in names else end!r}")
    return drop_blocks(gm, [(start, end, projection)], example_inputs)[0]


def drop_blocks(gm: fx.GraphModule, blocks: Sequence[tuple[str, str, nn.Module | None]],
                example_inputs: tuple | None = None) -> tuple[fx.GraphModule, list[str]]:
    """`drop_block` for many (start, end, projection) blocks at once, in the order given, on one copy with one
    shape check at the end (one propagation, not one per block). A block whose nodes a block before it
    already removed (nested in it) is skipped; returns the new module and the ends of the blocks dropped."""
    out = clone_gm(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    before, dropped = {}, []
    for start, end, projection in blocks:
        live = _live(out.graph) if dropped else set(out.graph.nodes)
        if start not in nodes or end not in nodes or nodes[end] not in live:
            continue  # inside a block dropped before
        s, e = nodes[start], nodes[end]
        repl = s
        if projection is not None:
            name = f"{end}_projection"
            out.add_submodule(name, copy.deepcopy(projection))
            with out.graph.inserting_after(s):
                repl = out.graph.call_module(name, (s,))
        e.replace_all_uses_with(repl, delete_user_cb=lambda u, repl=repl: u is not repl)
        _out_of_place_users(out, repl)
        nodes[repl.name] = repl
        before[repl.name] = e.meta.get("tensor_meta")
        dropped.append(end)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    if example_inputs is not None and dropped:
        _check_same_outputs(out, before, example_inputs)
    return out, dropped


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node`'s value depends on (not `node` itself): one walk back over the inputs."""
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the output depends on (fx's dead-code pass is much slower than this walk)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return ancestors(out) | {out}


def _out_of_place_users(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make the in-place ops that now read `node` out of place. Once a block is gone, an in-place op may follow
    one whose backward needs its own output (torchvision's ReLU(inplace) straight after the previous block's
    ReLU, the residual add between them dropped), which autograd refuses to train; out of place is always
    correct. Module objects here are the clone's own (clone_gm), so the caller's model is not touched."""
    for user in list(node.users):
        if user.op == "call_module":
            module = gm.get_submodule(user.target)
            if getattr(module, "inplace", False):
                module.inplace = False
        elif user.op == "call_method" and user.target.endswith("_") and hasattr(torch.Tensor, user.target[:-1]):
            user.target = user.target[:-1]
        elif user.op == "call_function" and user.kwargs.get("inplace"):
            user.update_kwarg("inplace", False)


def _check_same_outputs(gm: fx.GraphModule, expected: dict, example_inputs: tuple) -> None:
    """Propagate shapes; every node named in `expected` (name -> tensor_meta before) must keep its shape."""
    try:
        propagate(gm, example_inputs)
    except Exception as exc:
        raise PassError(f"the rewritten graph does not run: {exc}") from exc
    for n in gm.graph.nodes:
        before, after = expected.get(n.name), n.meta.get("tensor_meta")
        if before is not None and after is not None and tuple(before.shape) != tuple(after.shape):
            raise PassError(f"node {n.name!r} changed shape {tuple(before.shape)} -> {tuple(after.shape)}")
