"""Pass `lacd_drop`: LaCD layer-collapse diagnosis (papers/fcos-2505.21571, Stage 2).

The model is frozen; at the output of every candidate block (a residual block `x + f(x)`, or a plain
conv→norm→activation block whose input and output have the same spatial size) the features are
global-average-pooled and a linear probe (scikit-learn logistic regression) is fitted on part of the
calibration data and scored on the rest. A block's gain is its probe accuracy minus the previous probe's
(the first block is compared with a probe on the pooled model input); blocks with gain < `beta` add
nothing linearly decodable and are dropped with the shared `drop_block` primitive: a residual branch
becomes the identity; a plain block becomes the identity, or a 1×1 projection fitted by least squares on
the calibration features when its channel count changes. The record lists every probe's accuracy and what
was dropped and why. This file decides; it never edits a graph itself."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.errors import PassError
from fxslim.graph.shape import out_shape, propagate
from fxslim.module_state import eval_mode
from fxslim.options import Option, Schema, calib_samples_option
from fxslim.pass_api import PassContext, PassResult
from fxslim.rewrite import ancestors, drop_blocks
from fxslim.training import split_batch

NAME = "lacd_drop"
_ADDS = (operator.add, torch.add, operator.iadd)
_CONVS = (nn.Conv1d, nn.Conv2d)
_FOLLOWERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)


@dataclass
class Block:
    kind: str  # "residual" | "plain"
    start: str  # node whose value enters the block
    end: str  # node whose value leaves it


OPTIONS = Schema(
    Option("beta", float, "drop blocks whose probe-accuracy gain is below this (0.005 = half a point)"),
    calib_samples_option("calibration samples for the probes (70% fit, 30% scored)", minimum=20,
                         aliases=("probe_samples",)),
    Option("plain", bool, "also consider plain conv blocks (else residual blocks only)"),
    needs_data=lambda o, gm: "the probes' labelled samples",
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    beta: float = 0.005,
    calib_samples: int = 1024,
    plain: bool = True,
) -> PassResult:
    """beta: drop blocks whose probe-accuracy gain is below this (0.005 = half a point).
    calib_samples: calibration samples for the probes (70% fit, 30% scored).
    plain: also consider plain conv blocks (else residual blocks only)."""
    x, y = _calibration(ctx, calib_samples)
    blocks = candidate_blocks(gm, ctx.example_inputs, plain)
    if not blocks:
        return PassResult(gm, False, {"probes": [], "dropped": [], "reason": "no candidate block"})
    inputs = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    values = _capture(gm, x, [inputs] + [b.end for b in blocks] + [b.start for b in blocks if b.kind == "plain"])
    accs = [_probe(_pool(values[inputs]), y, ctx.seed)] + [_probe(_pool(values[b.end]), y, ctx.seed) for b in blocks]
    probes = [{"block": b.end, "kind": b.kind, "accuracy": accs[i + 1], "gain": accs[i + 1] - accs[i]}
              for i, b in enumerate(blocks)]
    # Last block first: a block's start node may be the end of the block before it.
    todo = [(b, p) for b, p in reversed(list(zip(blocks, probes, strict=True))) if p["gain"] < beta]
    proj = {b.end: _projection(values[b.start], values[b.end]) if b.kind == "plain" else None for b, _ in todo}
    try:  # all at once: one copy and one shape check
        new, ends = drop_blocks(gm, [(b.start, b.end, proj[b.end]) for b, _ in todo], ctx.example_inputs)
    except PassError:  # some block cannot go (e.g. a stride a projection cannot undo): find it one by one
        new, ends = gm, []
        for b, probe in todo:
            try:
                new, done = drop_blocks(new, [(b.start, b.end, proj[b.end])], ctx.example_inputs)
            except PassError as exc:
                probe["kept_because"] = str(exc).splitlines()[0]
                continue
            ends += done
    by_end = {b.end: (b, p) for b, p in todo}
    dropped = [{"block": e, "kind": by_end[e][0].kind, "gain": by_end[e][1]["gain"], "projection": proj[e] is not None}
               for e in reversed(ends)]
    ctx.debug("lacd_drop: probes %s dropped %s", probes, dropped)
    record = {"input_probe_accuracy": accs[0], "probes": probes, "dropped": dropped}
    return PassResult(new, bool(dropped), record)


def candidate_blocks(gm: fx.GraphModule, example_inputs: tuple, plain: bool = True) -> list[Block]:
    """Residual blocks (an add whose one input is an ancestor of the other) and plain conv blocks that keep
    the spatial size, in graph order."""
    propagate(gm, example_inputs)
    blocks, plains, in_branch = [], [], set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ADDS and len(node.all_input_nodes) == 2:
            a, b = node.all_input_nodes
            for skip, branch in ((a, b), (b, a)):
                root = _through_identity(gm, skip)
                up = ancestors(branch)
                if out_shape(skip) == out_shape(node) and root in up:
                    blocks.append(Block("residual", root.name, node.name))
                    in_branch |= ({branch} | up) - ancestors(root) - {root}
                    break
        elif plain and node.op == "call_module" and isinstance(gm.get_submodule(node.target), _CONVS):
            end = node
            while len(end.users) == 1 and _follows(gm, next(iter(end.users))):
                end = next(iter(end.users))
            src, out = out_shape(node.args[0]), out_shape(end)
            if src and out and src[2:] == out[2:]:
                plains.append((node, Block("plain", node.args[0].name, end.name)))
    # a conv inside a residual branch is part of that block, not a block of its own
    blocks += [b for conv, b in plains if conv not in in_branch]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(blocks, key=lambda b: order[b.end])


def _follows(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Norms and activations that belong to the conv before them."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _FOLLOWERS)
    return node.op == "call_function" and node.target in (torch.relu, F.relu, F.relu6, F.gelu, F.silu)


def _through_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node


def _calibration(ctx: PassContext, limit: int) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys, n = [], [], 0
    for batch in ctx.require_data(NAME):
        inputs, y = split_batch(batch)
        if y is None:
            raise PassError("needs (x, y) batches: the probes are trained on labels")
        xs.append(inputs[0])
        ys.append(y)
        n += len(y)
        if n >= limit:
            break
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit].numpy()


def _capture(gm: fx.GraphModule, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The values of the named nodes on `x` (eval mode, no grad), by running the graph once."""
    wanted, out = set(names), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in wanted:
                out[n.name] = result.detach()
            return result

    with eval_mode(gm), torch.no_grad():
        Recorder(gm).run(x)
    return out


def _pool(t: torch.Tensor) -> np.ndarray:
    return (t.mean(tuple(range(2, t.dim()))) if t.dim() > 2 else t).double().numpy()


def _probe(features: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Held-out accuracy of a logistic-regression probe (70% fit, 30% scored, seeded split)."""
    # Imported here: scikit-learn takes seconds to import, and only the probes need it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.7 * len(y))
    fit, score = order[:cut], order[cut:]
    scaler = StandardScaler().fit(features[fit])
    # tol 1e-3: the probe's accuracy is what counts, and 1e-4 cost 3x the time (DenseNet-121: 120 probes)
    clf = LogisticRegression(max_iter=500, tol=1e-3).fit(scaler.transform(features[fit]), y[fit])
    return float(clf.score(scaler.transform(features[score]), y[score]))


def _projection(src: torch.Tensor, dst: torch.Tensor) -> nn.Module | None:
    """A 1×1 conv fitted by least squares from the block's input to its output features (None when the
    channel counts already match: the identity)."""
    if src.shape == dst.shape:
        return None
    cin, cout = src.shape[1], dst.shape[1]
    a = src.movedim(1, -1).reshape(-1, cin).double()
    b = dst.movedim(1, -1).reshape(-1, cout).double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    sol = torch.linalg.lstsq(a1, b).solution  # (cin + 1, cout): weights and bias
    conv = (nn.Conv1d if src.dim() == 3 else nn.Conv2d)(cin, cout, 1)
    with torch.no_grad():
        conv.weight.copy_(sol[:cin].T.reshape(cout, cin, *([1] * (src.dim() - 2))).float())
        conv.bias.copy_(sol[cin].float())
    return conv
