"""Least-squares reconstruction of the layers that read pruned channels.

After channels are removed, each Conv1d/Conv2d/Linear whose *input* lost channels gets new weights
    W' = argmin_W ||X' Wᵀ - Y||² + λ ||W||²,
where X' are the layer's inputs in the pruned model (for a conv, the im2col patches at `positions` sampled
output positions per example) and Y the same layer's outputs in the unpruned model (its kept output channels
only), over calibration batches. This is the reconstruction step of channel pruning by He et al. 2017
("Channel Pruning for Accelerating Very Deep Neural Networks", Sec. 3.1, the least-squares half) and ThiNet
(Luo et al. 2017, Sec. 3.3). Layers are solved in graph order, each on the inputs that the layers solved
before it give, so the error does not pile up through the network. λ = `ridge` × the mean diagonal of X'ᵀX'.
The normal equations are accumulated batch by batch in float64 and solved with `torch.linalg.solve`.

Only plain selections are reconstructed (a plan that merges channels, as `fcos_fuse` does, already combines
its consumers exactly); grouped convs, string paddings and non-zero padding modes are skipped with a reason.
`refit_outputs_` solves the same problem for layers named explicitly, fitted to the output of another node of
the old model: the low-rank passes re-fit the last layer of each factorised chain to the original layer.
The caller owns `new` (a pass's fresh GraphModule; tensors it still shares with `old` are copied before
anything is written); `old` is only run, never changed."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.errors import PassError
from fxslim.graph.clone import detach_tensors
from fxslim.module_state import eval_mode
from fxslim.rewrite import ChannelPlan
from fxslim.symmetry import can_project, project_, rotations
from fxslim.training import split_batch

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class _Target:
    node: str  # the layer's node in new
    module: str  # qualified module name in new
    out_idx: np.ndarray | None  # kept output channels of the old layer, in their new order (None: all)
    old_node: str | None = None  # the node of old whose output it is fitted to (None: the same name)


def refit_after_pruning(
    new: fx.GraphModule, old: fx.GraphModule, plan: ChannelPlan, data: Iterable, batches: int, seed: int = 0
) -> list[dict]:
    """`reconstruct_` as a pruning pass runs it: on the first `batches` batches of `data`; for a model that
    declares a rotation group (e2cnn), each batch with all of the group's rot90 copies of its inputs (so the
    least-squares solution is itself equivariant) and the layout convs projected back onto the equivariant
    subspace after each layer (`fxslim.symmetry.project_`)."""
    ks = rotations(new)
    augment = (lambda x: torch.cat([x, *(torch.rot90(x, k, (-2, -1)) for k in ks)])) if ks else None
    project = project_ if can_project(new) else None
    calib = list(itertools.islice(data, batches))
    return reconstruct_(new, old, plan, calib, augment=augment, project=project, seed=seed)


def reconstruct_(
    new: fx.GraphModule,
    old: fx.GraphModule,
    plan: ChannelPlan,
    batches: Iterable,
    *,
    positions: int = 16,
    ridge: float = 1e-3,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    project: Callable[[fx.GraphModule], None] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Re-fit, in place on `new`, every layer whose input channels `plan` reduced (see the module doc).

    batches: calibration batches ((x, y) or x); augment: maps an input batch to the batch actually used (e.g.
    all rotations of it for a rotation-equivariant model); project: called on `new` after each layer is
    solved (e.g. the projection onto the equivariant subspace). Returns one record per layer: {"layer",
    "samples", "rel_error_before", "rel_error_after"} (relative L2 error of the layer's output on the
    calibration samples, with the sliced weights and with the solved ones), or {"layer", "skipped": reason}."""
    records, targets = [], []
    for target, reason in _targets(new, plan):
        if reason is not None:
            records.append({"layer": target.module, "skipped": reason})
        else:
            targets.append(target)
    return records + _refit(new, old, targets, batches, positions, ridge, augment, project, seed)


def refit_outputs_(
    new: fx.GraphModule,
    old: fx.GraphModule,
    pairs: dict[str, str],
    batches: Iterable,
    *,
    positions: int = 16,
    ridge: float = 1e-3,
    seed: int = 0,
) -> list[dict]:
    """Re-fit, in place on `new`, the Conv1d/Conv2d/Linear called at each node of `pairs` ({node of new: node
    of old}) so that its output matches the output of the old node (all its channels), by the same least
    squares as `reconstruct_`, in the graph order of `new`. For a layer replaced by a chain (a factorisation),
    `pairs` maps the chain's last layer to the original layer: the chain's other layers stay as they are and
    the last one absorbs their error. Returns the records of `reconstruct_`; a layer that is not an ungrouped
    Conv1d/Conv2d/Linear with zero padding is skipped with the reason."""
    old_names = {n.name for n in old.graph.nodes}
    if missing := sorted(set(pairs) - {n.name for n in new.graph.nodes}):
        raise PassError(f"reconstruct: no node {missing[0]!r} in the new model")
    records, targets = [], []
    for n in new.graph.nodes:
        if n.name not in pairs:
            continue
        if n.op != "call_module" or pairs[n.name] not in old_names:
            raise PassError(f"reconstruct: {n.name!r} is not a call_module node or {pairs[n.name]!r} not in old")
        t = _Target(n.name, str(n.target), None, pairs[n.name])
        reason = _skip_reason(new.get_submodule(t.module))
        if reason is not None:
            records.append({"layer": t.module, "skipped": reason})
        else:
            targets.append(t)
    return records + _refit(new, old, targets, batches, positions, ridge, None, None, seed)


def _skip_reason(mod: nn.Module) -> str | None:
    if not isinstance(mod, _LAYERS):
        return f"{type(mod).__name__} is not a Conv1d/Conv2d/Linear"
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        if mod.groups != 1:
            return f"grouped conv (groups={mod.groups})"
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            return f"padding {mod.padding!r} / padding_mode {mod.padding_mode!r}"
    return None


def _refit(
    new: fx.GraphModule,
    old: fx.GraphModule,
    targets: list[_Target],
    batches: Iterable,
    positions: int,
    ridge: float,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    project: Callable[[fx.GraphModule], None] | None,
    seed: int,
) -> list[dict]:
    if positions < 1 or ridge < 0:
        raise PassError(f"reconstruct: positions={positions} must be >= 1 and ridge={ridge} >= 0")
    inputs = [split_batch(b)[0] for b in batches]
    if not inputs:
        raise PassError("reconstruct: no calibration batches")
    if augment is not None:
        inputs = [(augment(x[0]), *x[1:]) for x in inputs]
    # `new` shares every tensor the cut left alone with `old` (copy-on-write clones); the re-fit and the
    # projection write in place, so `new` gets its own copies first and `old` is never touched.
    detach_tensors(new, old)
    records = []
    gen = torch.Generator().manual_seed(seed)
    # One pass of each model per batch: the layers are solved in graph order, each batch's run of `new`
    # waits before the layer being solved and goes on with its new weights.
    with eval_mode(old), eval_mode(new), torch.no_grad():
        runs = [(_Stepper(new, x), _Stepper(old, x)) for x in inputs]
        for t in targets:
            records.append(_solve(new, t, runs, positions, ridge, gen))
            if project is not None:
                project(new)
    return records


def _targets(new: fx.GraphModule, plan: ChannelPlan) -> list[tuple[_Target, str | None]]:
    """The layers of `new` (graph order) whose input channels the plan selected, with a skip reason or None."""
    params = {p.key: p for p in plan.dg.params}
    out = []
    for node in new.graph.nodes:
        if node.op != "call_module":
            continue
        mod = new.get_submodule(node.target)
        p = params.get(f"{node.target}.weight")
        if not isinstance(mod, _LAYERS) or p is None or len(p.ids) < 2 or p.ids[1] is None:
            continue
        d_in = plan.dest(p.ids[1])
        if d_in is None:
            continue  # its inputs are unchanged
        t = _Target(node.name, str(node.target), None)
        d_out = plan.dest(p.ids[0]) if p.ids[0] is not None else None
        if not d_in[2] or (d_out is not None and not d_out[2]):
            out.append((t, "merged channels (not a plain selection)"))
            continue
        if (reason := _skip_reason(mod)) is not None:
            out.append((t, reason))
            continue
        if d_out is not None:
            kept = np.flatnonzero(d_out[0] >= 0)
            t.out_idx = kept[np.argsort(d_out[0][kept], kind="stable")]
        out.append((t, None))
    return out


class _Stepper:
    """Runs a GraphModule node by node on one input and can stop anywhere: `input_of(node)` stops just before
    the node, `output_of(node)` just after it, and the next call goes on from there, so a layer re-fit in
    between runs with its new weights. Values are freed after their last use, as fx.Interpreter frees them."""

    def __init__(self, gm: fx.GraphModule, args: tuple) -> None:
        self.interp = fx.Interpreter(gm, garbage_collect_values=True)
        self.interp.env = {}
        self.interp.args_iter = iter(args)
        self.nodes = list(gm.graph.nodes)
        self.pos = 0

    def input_of(self, name: str) -> torch.Tensor:
        node = self._run_to(name)
        return self._tensor(self.interp.env.get(node.args[0]) if node.args else None, name, "input")

    def output_of(self, name: str) -> torch.Tensor:
        node = self._run_to(name)
        value = self.interp.env[node] = self.interp.run_node(node)
        self._step(node)
        return self._tensor(value, name, "output")

    def _run_to(self, name: str) -> fx.Node:
        while self.pos < len(self.nodes):
            node = self.nodes[self.pos]
            if node.name == name:
                return node
            self.interp.env[node] = self.interp.run_node(node)
            self._step(node)
        raise PassError(f"reconstruct: node {name!r} not reached (not in the graph, or before a layer solved earlier)")

    def _step(self, node: fx.Node) -> None:
        for done in self.interp.user_to_last_uses.get(node, []):
            self.interp.env.pop(done, None)
        self.pos += 1

    @staticmethod
    def _tensor(value, name: str, want: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise PassError(f"reconstruct: node {name!r} gave no tensor {want}")
        return value


def _rows(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, positions: int, gen: torch.Generator):
    """(A, B): the layer's input rows (im2col patches for a conv) and the matching output rows."""
    if isinstance(mod, nn.Linear):
        a, b = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if len(a) > positions * len(x):  # a sequence: sample rows as a conv samples positions
            keep = torch.randperm(len(a), generator=gen)[: positions * len(x)]
            a, b = a[keep], b[keep]
        return a, b
    if isinstance(mod, nn.Conv1d):
        x, y = x.unsqueeze(2), y.unsqueeze(2)
        k, s, p, d = (1, *mod.kernel_size), (1, *mod.stride), (0, *mod.padding), (1, *mod.dilation)
    else:
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C·kh·kw, L)
    n, dim, length = cols.shape
    y = y.reshape(n, y.shape[1], -1)
    if y.shape[2] != length:
        raise PassError(f"reconstruct: {type(mod).__name__} output has {y.shape[2]} positions, im2col {length}")
    pick = torch.randint(0, length, (n, min(positions, length)), generator=gen)
    a = torch.gather(cols, 2, pick[:, None, :].expand(n, dim, pick.shape[1])).transpose(1, 2).reshape(-1, dim)
    b = torch.gather(y, 2, pick[:, None, :].expand(n, y.shape[1], pick.shape[1])).transpose(1, 2)
    return a, b.reshape(-1, y.shape[1])


def _solve(
    new: fx.GraphModule,
    t: _Target,
    runs: list[tuple[_Stepper, _Stepper]],
    positions: int,
    ridge: float,
    gen: torch.Generator,
) -> dict:
    mod = new.get_submodule(t.module)
    bias = mod.bias is not None
    gram = rhs = None
    y_sq, samples = 0.0, 0
    for run_new, run_old in runs:
        y = run_old.output_of(t.old_node or t.node)
        a, b = _rows(mod, run_new.input_of(t.node), y, positions, gen)
        if t.out_idx is not None:
            b = b[:, torch.as_tensor(t.out_idx)]
        a = a.double()
        if bias:
            a = torch.cat([a, a.new_ones(len(a), 1)], 1)
        b = b.double()
        gram = a.T @ a if gram is None else gram + a.T @ a
        rhs = a.T @ b if rhs is None else rhs + a.T @ b
        y_sq += float(b.pow(2).sum())
        samples += len(a)
    w_now = mod.weight.detach().reshape(mod.weight.shape[0], -1).double()
    if bias:
        w_now = torch.cat([w_now, mod.bias.detach().double()[:, None]], 1)

    def rel_error(w: torch.Tensor) -> float:  # ||A wᵀ - B|| / ||B|| from the accumulated sums
        sq = float((w @ gram * w).sum() - 2 * (w * rhs.T).sum()) + y_sq
        return float(np.sqrt(max(sq, 0.0) / max(y_sq, 1e-300)))

    reg = ridge * float(gram.diagonal().mean()) if len(gram) else 0.0
    w = torch.linalg.solve(gram + reg * torch.eye(len(gram), dtype=gram.dtype), rhs).T
    before, after = rel_error(w_now), rel_error(w)
    with torch.no_grad():
        cols = w[:, :-1] if bias else w
        mod.weight.copy_(cols.reshape(mod.weight.shape).to(mod.weight.dtype))
        if bias:
            mod.bias.copy_(w[:, -1].to(mod.bias.dtype))
    return {"layer": t.module, "samples": samples, "rel_error_before": before, "rel_error_after": after}
