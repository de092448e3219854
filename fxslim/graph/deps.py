"""The dependency analyzer: which channels of which tensors must be removed or merged together.

Every dim of every tensor in the graph gets an array of integer index ids; the per-op rules in graph/rules/
tie ids together (`unify`). Connected components of those ties (scipy's union-find equivalent over an
edge list, linear in the number of indices) give **atoms**: the smallest units that can be removed, each
spanning every tensor and parameter slice it touches. Atoms born in the same channel space (a conv's
outputs, a residual stream) form a **group**: the set a pass ranks and shrinks together. An atom that
reaches a model input or output, a fixed dim (batch, spatial), an op with no rule or an ignored module is
frozen. Models that declare a field layout (e2cnn models, `gm.meta["field_layout"]`) get each field of each
layout conv tied into one atom: a field is removed whole or not at all. This file only analyses; it never
changes the graph."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxslim.errors import AnalysisError
from fxslim.graph.rules import CHANNEL, FIXED, SLICE, rule_for
from fxslim.graph.shape import propagate


@dataclass(frozen=True)
class Member:
    """One tensor dim (or parameter dim) that a group's channels run through."""

    node: str
    dim: int
    size: int

    def __repr__(self) -> str:
        return f"{self.node}[{self.dim}]"


@dataclass(frozen=True)
class Unsupported:
    node: str
    op: str
    target: str
    reason: str


@dataclass
class ParamDims:
    """A parameter/buffer whose dims carry channel ids; `roles[k]` says how a merge combines dim k:
    "out" (producer rows: averaged), "in" (consumer columns: summed), "norm"/"param" (averaged)."""

    key: str  # qualified name in the GraphModule, e.g. "layer1.0.conv1.weight"
    ids: list  # one id array (or None: dim not tied to channels) per tensor dim
    roles: list


@dataclass(eq=False)
class Group:
    """Coupled channels that are ranked and removed (or merged) together.

    `atoms[i]` is channel i of the group, in the order of the first channel space that created it."""

    index: int
    atoms: np.ndarray
    frozen: np.ndarray  # bool per channel: channel i may not be removed
    members: list[Member]
    reason: str | None
    dg: DependencyGraph = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.atoms)

    @property
    def prunable(self) -> bool:
        return self.size > 1 and not bool(self.frozen.all())

    def __repr__(self) -> str:
        head = ", ".join(map(repr, self.members[:4])) + (", ..." if len(self.members) > 4 else "")
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        return f"Group#{self.index}(size={self.size}, {state}, members=[{head}])"


@dataclass
class DependencyGraph:
    gm: fx.GraphModule
    values: dict  # node -> ids: list of arrays (tensor), tuple of those (tuple output) or None
    label: np.ndarray  # atom of every index id
    atom_group: np.ndarray  # group index of every atom, -1 when the atom is not a channel
    groups: list[Group]
    unsupported: list[Unsupported]
    params: list[ParamDims]
    example_inputs: tuple = ()

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, node: str, dim: int = 1) -> Group | None:
        """The group whose channels run through `node`'s output dim `dim` (None when none does)."""
        n = next((n for n in self.gm.graph.nodes if n.name == node), None)
        ids = self.values.get(n) if n is not None else None
        if not isinstance(ids, list) or dim >= len(ids):
            return None
        g = self.atom_group[self.label[ids[dim]]]
        g = g[g >= 0]
        return self.groups[int(g[0])] if len(g) else None

    def merge_classes(self, group: Group) -> list[np.ndarray]:
        """Partition `group`'s channels into classes that may be merged with each other: channels that run
        through exactly the same tensor dims the same number of times (a split sends two channels of one
        group to different consumers; fusing them could not be exact)."""
        if not group.size:
            return []
        _, cls = np.unique(self._atom_signatures[group.atoms], return_inverse=True)
        return [np.flatnonzero(cls == c) for c in range(cls.max() + 1)]

    @cached_property
    def _atom_signatures(self) -> np.ndarray:
        """Per atom, an order-free hash of the multiset {(tensor dim, how many of its ids run through it)},
        computed once for the whole graph (linear in the number of ids), not once per group."""
        dims = [ids for v in self.values.values() for _, ids in dims_of(v)]
        sig = np.zeros(len(self.atom_group), dtype=np.uint64)
        if not dims:
            return sig
        atoms = self.label[np.concatenate(dims)].astype(np.int64)
        dim = np.repeat(np.arange(len(dims), dtype=np.int64), [len(ids) for ids in dims])
        pairs, counts = np.unique(atoms * len(dims) + dim, return_counts=True)
        h = (pairs % len(dims) + 1).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= counts.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)  # splitmix64-style finaliser: sums of mixed words rarely collide
        np.add.at(sig, pairs // len(dims), h)
        return sig

    def summary(self) -> str:
        lines = [
            f"{len(self.groups)} groups ({len(self.prunable_groups)} prunable), {len(self.unsupported)} unsupported ops"
        ]
        lines += [f"  {g!r}" for g in self.groups]
        lines += [f"  unsupported: {u.node} ({u.target}): {u.reason}" for u in self.unsupported]
        return "\n".join(lines)


class Builder:
    """State the rules write into while the graph is walked once in topological order (`rules.DepsBuilder`)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))  # qualified name -> module, every path
        self.n = 0
        self.kind = np.empty(4096, dtype=np.int8)
        self.spaces: list[np.ndarray] = []  # CHANNEL spaces, in creation order
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.values: dict = {}
        self.params: dict[str, ParamDims] = {}

    # ids -------------------------------------------------------------------------------------------
    def fresh_dim(self, size: int, kind: int) -> np.ndarray:
        while self.n + size > len(self.kind):
            self.kind = np.concatenate([self.kind, np.empty_like(self.kind)])
        ids = np.arange(self.n, self.n + size, dtype=np.int64)
        self.kind[self.n : self.n + size] = kind
        self.n += size
        if kind == CHANNEL:
            self.spaces.append(ids)
        return ids

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.edges.append((a.ravel(), b.ravel()))

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self.frozen.append((np.asarray(ids).ravel(), reason))

    def freeze_value(self, value, reason: str) -> None:
        for ids in _flat_ids(self.raw(value) if isinstance(value, fx.Node) else value):
            self.freeze(ids, reason)

    def mark_summed(self, value, dim: int) -> None:
        """`value`'s dim `dim` is summed over (matmul/einsum contraction): when `value` is a parameter, that
        dim is consumer columns, summed (not averaged) when channels merge."""
        if isinstance(value, fx.Node) and value.op == "get_attr" and value.target in self.params:
            self.params[value.target].roles[dim] = "in"

    def may_prune(self, ids: np.ndarray) -> bool:
        k = self.kind[ids]
        return bool(((k == CHANNEL) | (k == SLICE)).any())

    # values ----------------------------------------------------------------------------------------
    def raw(self, arg):
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def ids(self, arg) -> list | None:
        v = self.raw(arg)
        return v if isinstance(v, list) else None

    def is_tensor(self, arg) -> bool:
        return isinstance(self.raw(arg), list)

    def shape(self, node) -> tuple | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def shapes(self, node) -> list | None:
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, (tuple, list)):
            return None
        return [tuple(m.shape) if isinstance(m, TensorMetadata) else None for m in meta]

    # parameters ------------------------------------------------------------------------------------
    def param(self, node: fx.Node, attr: str, kinds: list, roles: list, like: list | None = None) -> list:
        """Ids of the dims of parameter `attr` of the module called by `node` (shared modules share ids)."""
        key = f"{node.target}.{attr}"
        return self._param(key, _tensor_at(self.gm, key, self.modules), kinds, roles, like)

    def _param(self, key: str, tensor, kinds: list, roles: list, like: list | None) -> list:
        roles = list(roles) + [None] * (tensor.dim() - len(roles))
        if key in self.params:
            ids = self.params[key].ids
            for k, l in enumerate(like or []):
                if l is not None and ids[k] is not None:
                    self.unify(ids[k], l)
            return ids
        ids = []
        for k in range(tensor.dim()):
            if like is not None and k < len(like) and like[k] is not None:
                ids.append(like[k])
            elif k < len(kinds) and kinds[k] is not None:
                ids.append(self.fresh_dim(tensor.shape[k], kinds[k]))
            else:
                ids.append(None)
        self.params[key] = ParamDims(key, ids, roles)
        return ids


def _tensor_at(gm: fx.GraphModule, key: str, modules: dict[str, nn.Module] | None = None):
    """The parameter or buffer at a qualified name (None when it is neither); `modules` (qualified name ->
    module) saves walking the module path attribute by attribute."""
    owner_name, _, attr = key.rpartition(".")
    owner = modules.get(owner_name) if modules is not None else None
    if owner is not None:
        param = owner._parameters.get(attr)
        return param if param is not None else owner._buffers.get(attr)
    try:
        return gm.get_parameter(key)
    except AttributeError:
        try:
            return gm.get_buffer(key)
        except AttributeError:
            return None


def _flat_ids(value) -> Iterable[np.ndarray]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, np.ndarray))
    elif isinstance(value, tuple):
        for v in value:
            yield from _flat_ids(v)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _fresh_like_meta(b: Builder, node: fx.Node):
    if (shape := b.shape(node)) is not None:
        return [b.fresh_dim(s, FIXED) for s in shape]
    if (shapes := b.shapes(node)) is not None:
        return tuple(None if s is None else [b.fresh_dim(d, FIXED) for d in s] for s in shapes)
    return None


def _check(node: fx.Node, b: Builder, out) -> None:
    """A rule must produce one id per element of every output dim; anything else is a rule bug."""
    want = b.shape(node)
    if isinstance(out, list) and want is not None:
        if [len(a) for a in out] != list(want):
            raise AnalysisError(
                f"rule for node {node.name!r} ({_target_name(node)}) produced dims "
                f"{[len(a) for a in out]} for output shape {list(want)}"
            )


def _walk(gm: fx.GraphModule, b: Builder, unsupported: list[Unsupported]) -> None:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            b.values[node] = _fresh_like_meta(b, node)
            b.freeze_value(node, f"model input {node.name!r}")
        elif node.op == "output":
            for a in node.all_input_nodes:
                b.freeze_value(a, f"reaches the model output through {a.name!r}")
        elif node.op == "get_attr":
            tensor = _tensor_at(gm, node.target, b.modules)
            ids = None
            if tensor is not None and b.shape(node) is not None:
                ids = b._param(node.target, tensor, [SLICE] * tensor.dim(), ["param"] * tensor.dim(), None)
            b.values[node] = ids
        elif all(b.raw(a) is None for a in node.all_input_nodes) and node.op != "call_module":
            # Python arithmetic on sizes, or a new constant tensor (torch.zeros(n)): nothing to couple
            b.values[node] = _fresh_like_meta(b, node)
        else:
            rule, mod = rule_for(node, gm)
            try:
                out = rule.couple(b, node, mod) if rule is not None else None
            except (IndexError, KeyError, TypeError, ValueError, AttributeError):
                out = None  # arguments the rule does not understand (e.g. unusual keywords): frozen, not guessed
            if out is False:  # reads sizes only
                b.values[node] = None
                continue
            if out is None:
                reason = "no channel rule" if rule is None else "rule cannot handle these arguments"
                what = type(mod).__name__ if mod is not None else _target_name(node)
                unsupported.append(Unsupported(node.name, node.op, what, reason))
                for a in node.all_input_nodes:
                    b.freeze_value(a, f"used by {node.name!r} ({what}), which has {reason}")
                out = _fresh_like_meta(b, node)
            _check(node, b, out)
            b.values[node] = out


def _freeze_ignored(gm: fx.GraphModule, b: Builder, ignore: Iterable[str]) -> None:
    names = dict(gm.named_modules())
    for name in ignore:
        if name not in names:
            raise AnalysisError(f"ignore: no module named {name!r} in the model")
        for key, p in b.params.items():
            if key.startswith(name + "."):
                for ids in p.ids:
                    if ids is not None:
                        b.freeze(ids, f"module {name!r} is in ignore")
        for node in gm.graph.nodes:
            if node.op == "call_module" and (node.target == name or node.target.startswith(name + ".")):
                b.freeze_value(node, f"module {name!r} is in ignore")


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray]:
    pairs = [np.broadcast_arrays(x, y) for x, y in edges]
    a = np.concatenate([x.ravel() for x, _ in pairs]) if pairs else np.zeros(0, dtype=np.int64)
    c = np.concatenate([y.ravel() for _, y in pairs]) if pairs else np.zeros(0, dtype=np.int64)
    m = sp.coo_matrix((np.ones(len(a), dtype=np.int8), (a, c)), shape=(n, n))
    return connected_components(m, directed=False)


def _couple_fields(gm: fx.GraphModule, b: Builder) -> None:
    """Tie the channels of each field of each layout conv into one atom (e2cnn models: a C4 regular field
    is 4 consecutive channels that a rotation permutes among themselves)."""
    for f in gm.meta.get("field_layout", ()):
        p = b.params.get(f"{f.layer}.weight")
        if p is None or p.ids[0] is None or f.field_size == 1:
            continue
        ids = p.ids[0]
        if len(ids) % f.field_size:
            raise AnalysisError(
                f"layer {f.layer!r} has {len(ids)} output channels, not whole fields of "
                f"{f.field_size}: its field layout no longer matches the weights"
            )
        fields = ids.reshape(-1, f.field_size)
        b.unify(fields, np.broadcast_to(fields[:, :1], fields.shape))


def analyze(
    model_or_gm: nn.Module, example_inputs: tuple, *, ignore: Iterable[str] = (), fields: bool = True
) -> DependencyGraph:
    """Annotate shapes and compute the channel groups of a model (traced first unless a GraphModule).

    `fields=False` ignores a declared field layout (single channels of e2cnn layers become removable; only
    for experiments that show what a misaligned cut does: the pass manager rejects such a result)."""
    from fxslim.trace import trace

    gm = model_or_gm if isinstance(model_or_gm, fx.GraphModule) else trace(model_or_gm)
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    propagate(gm, example_inputs, reuse=True)
    b = Builder(gm)
    unsupported: list[Unsupported] = []
    _walk(gm, b, unsupported)
    if fields:
        _couple_fields(gm, b)
    _freeze_ignored(gm, b, ignore)

    n_atoms, label = _components(b.n, b.edges)
    kind = b.kind[: b.n]
    reasons = ["coupled to a batch, spatial or other fixed dim"]
    atom_reason = np.full(n_atoms, -1, dtype=np.int64)
    atom_reason[label[kind == FIXED]] = 0
    for ids, why in b.frozen:
        reasons.append(why)
        atom_reason[label[ids]] = len(reasons) - 1
    is_channel = np.zeros(n_atoms, dtype=bool)
    is_channel[label[kind == CHANNEL]] = True

    # Atoms born in one channel space are one group (residual adds make two spaces share atoms).
    edges = [(label[s[:1]], label[s]) for s in b.spaces]
    _, glabel = _components(n_atoms, edges)
    src = label[np.concatenate(b.spaces)] if b.spaces else np.zeros(0, dtype=np.int64)
    _, first = np.unique(src, return_index=True)
    ordered = src[np.sort(first)]  # channel atoms in order of first appearance
    ordered = ordered[is_channel[ordered]]
    # groups numbered in order of their first channel atom
    labels, first_at, inverse = np.unique(glabel[ordered], return_index=True, return_inverse=True)
    n_groups = len(labels)
    rank = np.empty(n_groups, dtype=np.int64)
    rank[np.argsort(first_at, kind="stable")] = np.arange(n_groups)
    gidx = rank[inverse.reshape(-1)]
    atom_group = np.full(n_atoms, -1, dtype=np.int64)
    atom_group[ordered] = gidx
    order = np.argsort(gidx, kind="stable")
    bounds = np.searchsorted(gidx[order], np.arange(n_groups + 1))

    members: list[list[Member]] = [[] for _ in range(n_groups)]
    dims = [(node.name, k, ids) for node, value in b.values.items() for k, ids in dims_of(value)]
    # parameters whose dims live in no graph value (e.g. attention heads inside a leaf module) count too
    dims += [(p.key, k, ids) for p in b.params.values() for k, ids in enumerate(p.ids) if ids is not None]
    for d, g in _dim_groups(dims, atom_group, label):
        name, k, ids = dims[d]
        members[g].append(Member(name, k, len(ids)))

    dg = DependencyGraph(gm, b.values, label, atom_group, [], unsupported, list(b.params.values()), example_inputs)
    for g in range(n_groups):
        atoms = ordered[order[bounds[g] : bounds[g + 1]]]
        frozen = atom_reason[atoms] >= 0
        reason = None
        if frozen.all():
            reason = reasons[int(atom_reason[atoms[0]])]
        elif len(atoms) == 1:
            reason = "a single channel"
        dg.groups.append(Group(g, atoms, frozen, members[g], reason, dg))
    return dg


def _dim_groups(dims: list, atom_group: np.ndarray, label: np.ndarray) -> list[tuple[int, int]]:
    """Every (dim index, group) pair such that some channel of the group runs through dim `dims[i][2]`,
    sorted by dim then group: one vectorised pass instead of a `np.unique` per dim. Dims that hold the very
    same id array (a value passed through unchanged: a quarter of ResNet-50's dims are distinct) are looked
    up once."""
    slot: dict[int, int] = {}
    arrays, which = [], []
    for _, _, ids in dims:
        j = slot.setdefault(id(ids), len(arrays))
        if j == len(arrays):
            arrays.append(ids)
        which.append(j)
    sizes = [len(ids) for ids in arrays]
    if not sum(sizes):
        return []
    group = atom_group[label[np.concatenate(arrays)]]
    arr = np.repeat(np.arange(len(arrays), dtype=np.int64), sizes)
    keep = group >= 0
    key = arr[keep] * (len(atom_group) + 1) + group[keep]
    # runs of one (array, group) pair (an array's channels mostly share one group) are one key before the sort
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    pairs = np.unique(key)
    per_array: list[list[int]] = [[] for _ in arrays]
    for a, g in zip((pairs // (len(atom_group) + 1)).tolist(), (pairs % (len(atom_group) + 1)).tolist(), strict=True):
        per_array[a].append(g)
    return [(d, g) for d, j in enumerate(which) for g in per_array[j]]


def dims_of(value) -> Iterable[tuple[int, np.ndarray]]:
    if isinstance(value, list):
        yield from ((k, ids) for k, ids in enumerate(value) if isinstance(ids, np.ndarray))
    elif isinstance(value, tuple):
        for v in value:
            yield from dims_of(v)
