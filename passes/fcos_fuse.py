"""Pass `fcos_fuse`: FCOS channel fusion (papers/fcos-2505.21571, Stage 1).

Per prunable dependency group (residual and concat groups fuse together), each channel is described by
its producer weights: the rows of every conv/linear that creates it (and their biases), concatenated. The
channels are clustered agglomeratively on cosine distance (scipy `linkage`/`fcluster`; average linkage by
default) into `ceil((1 - epsilon) * C)` clusters, or cut at a distance `threshold`; each cluster becomes one
channel through the shared `merge_channels` primitive: producer rows and norm statistics averaged (the
paper's Eq. 5, or weighted by the rows' L1 norms), consumer columns summed, so exact duplicates fuse with
zero error (unless a LayerNorm/GroupNorm computes statistics across the fused channels). Clusters never
cross `DependencyGraph.merge_classes` (channels on different sides of a split).
This file decides what to fuse; it never edits a graph itself."""

from __future__ import annotations

import math

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from torch import fx

from fxslim.errors import PassError
from fxslim.graph.deps import DependencyGraph, Group, analyze
from fxslim.options import Option, Requires, Schema, ignore_option
from fxslim.pass_api import PassContext, PassResult
from fxslim.rewrite import ChannelPlan, apply_plan, occurrence_rank

NAME = "fcos_fuse"
LINKAGES = ("average", "complete", "single", "ward")
WEIGHTINGS = ("mean", "l1")

OPTIONS = Schema(
    Option("epsilon", float, "fraction of each group's channels fused away: ceil((1 - epsilon) * C) clusters",
           range="[0, 1)", none=True),
    Option("threshold", float, "cut the dendrogram at this cosine distance instead (set epsilon to None)",
           range=">= 0", none=True),
    Option("linkage", str, "agglomerative clustering linkage (ward on unit-normalised rows)", choices=LINKAGES),
    Option("how", str, "producer rows of a cluster: mean (the paper's Eq. 5) or l1-weighted", choices=WEIGHTINGS),
    ignore_option("module names whose channels are never fused"),
    rules=[Requires(lambda o: (o["epsilon"] is None) != (o["threshold"] is None),
                    "give exactly one of epsilon (fraction fused away) and threshold (cosine distance)")],
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    epsilon: float | None = 0.5,
    threshold: float | None = None,
    linkage: str = "average",
    how: str = "mean",
    ignore: list[str] | tuple[str, ...] = (),
) -> PassResult:
    """epsilon: fraction of each group's channels fused away (k = ceil((1 - epsilon) * C) clusters), in [0, 1).
    threshold: cut the dendrogram at this cosine distance instead (set epsilon to None).
    linkage: "average" | "complete" | "single" | "ward" (ward on unit-normalised rows).
    how: "mean" (the paper's Eq. 5) or "l1" (producer rows weighted by their L1 norms).
    ignore: module names whose channels are never fused."""
    dg = analyze(gm, ctx.example_inputs, ignore=ignore)
    groups = dg.prunable_groups
    if not groups:
        raise PassError(f"no prunable group in {type(gm).__name__}:\n{dg.summary()}")
    plan = ChannelPlan(dg)
    per_group = []
    for g in groups:
        rows = producer_rows(dg, g)
        clusters = []
        for cls in dg.merge_classes(g):
            cls = cls[~g.frozen[cls]]
            clusters += _cluster(rows[cls], epsilon, threshold, linkage, cls)
        weights = np.abs(rows).sum(1) + 1e-12 if how == "l1" else None
        plan.merge(g, clusters, weights)
        fused = sum(len(c) - 1 for c in clusters)
        per_group.append({"members": [repr(m) for m in g.members[:3]], "size": g.size, "fused": fused})
    total = sum(r["fused"] for r in per_group)
    ctx.debug("fcos_fuse: %s", per_group)
    if not total:
        return PassResult(gm, False, {"groups": len(groups), "fused": 0})
    return PassResult(apply_plan(gm, plan), True, {"groups": len(groups), "fused": total, "per_group": per_group})


def producer_rows(dg: DependencyGraph, group: Group) -> np.ndarray:
    """One row per channel of `group`: the weights of every producer of that channel, concatenated."""
    tensors = dict(dg.gm.named_parameters())
    index = np.full(len(dg.atom_group), -1, dtype=np.int64)
    index[group.atoms] = np.arange(group.size)
    blocks = []
    for p in dg.params:
        t = tensors.get(p.key)
        for k, ids in enumerate(p.ids):
            if t is None or ids is None or p.roles[k] != "out":
                continue
            pos = index[dg.label[ids]]
            if (pos < 0).all():
                continue
            flat = t.detach().double().movedim(k, 0).reshape(len(ids), -1).numpy()
            # A channel that owns several rows (a head's q/k/v rows, a whole group of a grouped conv) gets
            # them side by side, in order, so two channels only look alike when row i matches row i.
            inside = pos >= 0
            rank = occurrence_rank(pos[inside])
            block = np.zeros((group.size, int(rank.max()) + 1, flat.shape[1]))
            block[pos[inside], rank] = flat[inside]
            blocks.append(block.reshape(group.size, -1))
    if not blocks:
        raise PassError(f"{group!r} has no producer weights to compare")
    return np.concatenate(blocks, axis=1)


def _cluster(rows: np.ndarray, epsilon, threshold, method: str, channels: np.ndarray) -> list[np.ndarray]:
    n = len(rows)
    if n < 2:
        return []
    if threshold is None:
        k = max(1, math.ceil((1 - epsilon) * n))
        if k >= n:
            return []
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    if method == "ward":
        z = hierarchy.linkage(unit, method="ward")
    else:  # cosine distance; an all-zero row is at distance 1 from everything but another zero row
        dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
        zero = norms[:, 0] == 0
        dist[zero, :] = dist[:, zero] = 1.0
        dist[np.ix_(zero, zero)] = 0.0
        np.fill_diagonal(dist, 0.0)
        z = hierarchy.linkage(squareform(dist, checks=False), method=method)
    labels = hierarchy.fcluster(z, t=threshold, criterion="distance") if threshold is not None else \
        hierarchy.fcluster(z, t=k, criterion="maxclust")
    return [channels[labels == c] for c in np.unique(labels) if (labels == c).sum() > 1]
