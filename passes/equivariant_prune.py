"""Pass `equivariant_prune`: structured pruning that keeps an e2cnn model's rotation invariance.

scope="linear" is the equivariant-pruning paper's method (papers/equivariant-pruning-2511.17242, pipeline
steps 3-4): every Linear layer whose outputs are not the model's logits keeps its `floor(C_out·(1−p))`
output units of highest L2 norm (the norm of the unit's weight row); the next layer's input columns are
sliced with them. After the invariant group pooling these units carry no field structure, so any subset
keeps the invariance. scope="fields" (beyond the paper) prunes the R2Conv layers of the declared field
layout by whole fields, `floor(F·(1−p))` of F fields kept by the L2 norm of the field's filter rows: a
rotation permutes the channels inside a field, so removing whole fields keeps the equivariance, where a
single-channel cut breaks it. scope="all" does both at once. The plan is applied by the shared
`rewrite.apply_plan`; the layout in `gm.meta` is updated to the new field counts. This pass never mutates
its input and never cuts a field.

reconstruct=True (beyond the paper; needs data) re-fits every layer that lost input channels by least
squares to the unpruned layer's outputs on `calib_batches` calibration batches (`fxslim.reconstruct`, He et
al. 2017 / ThiNet), each batch with all the declared rotations of its inputs so the solution is itself
equivariant, then projected onto the equivariant subspace (`e2cnn_adapter.symmetrize_`, exact to fp32). A
whole-field cut leaves the C4 zoo net near chance; the reconstructed net starts its fine-tune far above it."""

from __future__ import annotations

import math

import numpy as np
from torch import fx, nn

from fxslim import e2cnn_adapter
from fxslim.errors import PassError
from fxslim.graph.deps import DependencyGraph, Group, analyze
from fxslim.options import CALIB_BATCHES, RECONSTRUCT, Option, Schema, ignore_option, reconstruct_needs_data
from fxslim.pass_api import PassContext, PassResult
from fxslim.reconstruct import refit_after_pruning
from fxslim.rewrite import ChannelPlan, apply_plan

NAME = "equivariant_prune"
SCOPES = ("linear", "fields", "all")

OPTIONS = Schema(
    Option("ratio", float, "fraction of each pruned layer's units or fields removed (at least one kept)",
           range="[0, 1)"),
    Option("scope", str, "linear (the paper: Linear units), fields (whole R2Conv fields) or all", choices=SCOPES),
    ignore_option("module names never pruned"),
    RECONSTRUCT,
    CALIB_BATCHES,
    needs_data=reconstruct_needs_data,
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    ratio: float = 0.5,
    scope: str = "linear",
    ignore: list[str] | tuple[str, ...] = (),
    reconstruct: bool = False,
    calib_batches: int = 8,
) -> PassResult:
    """ratio: fraction p of each pruned layer's units (scope linear) or fields (scope fields) removed;
    `floor(C·(1−p))` are kept, at least one. scope: "linear" (the paper), "fields" or "all".
    ignore: module names never pruned. reconstruct: least-squares re-fit of the layers that read pruned
    channels, on the first `calib_batches` batches of data (see the module doc).

    record: {"scope", "ratio", "layers": [{"layer", "kind", "before", "after"}], "removed_units",
    "removed_fields"}, and with reconstruct "reconstructed": [{"layer", "samples", "rel_error_before",
    "rel_error_after"}]."""
    data = ctx.require_data(NAME) if reconstruct else None
    layout = gm.meta.get(e2cnn_adapter.LAYOUT_META) or []
    if scope == "fields" and not layout:
        raise PassError(
            f"scope='fields' needs a model with a field layout (an e2cnn model "
            f"traced by fxslim); {type(gm).__name__} declares none"
        )
    dg = analyze(gm, ctx.example_inputs, ignore=ignore)
    targets: list[tuple[str, str, Group, np.ndarray]] = []
    if scope in ("linear", "all"):
        targets += _linear_targets(dg)
    if scope in ("fields", "all"):
        targets += _field_targets(dg, layout)
    plan = ChannelPlan(dg)
    layers, seen = [], set()
    for layer, kind, group, scores in targets:
        if group.index in seen:
            raise PassError(
                f"layer {layer!r} shares its channels with another pruned layer "
                f"({group!r}); prune them with prune_channels instead"
            )
        seen.add(group.index)
        cand = np.flatnonzero(~group.frozen)
        keep_n = max(1, math.floor(group.size * (1 - ratio)))
        n_drop = min(group.size - keep_n, len(cand))
        order = np.argsort(scores[cand], kind="stable")  # lowest L2 norm first
        plan.target[group.atoms[cand[order[:n_drop]]]] = -1
        layers.append({"layer": layer, "kind": kind, "before": group.size, "after": group.size - n_drop})
    record = {
        "scope": scope,
        "ratio": ratio,
        "layers": layers,
        "removed_units": sum(r["before"] - r["after"] for r in layers if r["kind"] == "linear"),
        "removed_fields": sum(r["before"] - r["after"] for r in layers if r["kind"] == "fields"),
    }
    ctx.debug("equivariant_prune: %s", layers)
    if not any(r["before"] != r["after"] for r in layers):
        return PassResult(gm, False, record)
    new = apply_plan(gm, plan)
    if layout:
        new.meta[e2cnn_adapter.LAYOUT_META] = e2cnn_adapter.current_layout(new, layout)
    if reconstruct:
        record["reconstructed"] = refit_after_pruning(new, gm, plan, data, calib_batches, ctx.seed)
    return PassResult(new, True, record)


def _row_norms(dg: DependencyGraph, group: Group, key: str) -> np.ndarray:
    """L2 norm of the rows of parameter `key` (dim 0) that belong to each channel of `group` (a field:
    all its channels' rows together), by atom."""
    p = next(p for p in dg.params if p.key == key)
    w = dg.gm.get_parameter(key).detach().double()
    sq = w.pow(2).reshape(w.shape[0], -1).sum(1).numpy()
    n = int(dg.label.max()) + 1
    per_atom = np.bincount(dg.label[p.ids[0]], weights=sq, minlength=n)
    return np.sqrt(per_atom[group.atoms])


def _linear_targets(dg: DependencyGraph) -> list[tuple[str, str, Group, np.ndarray]]:
    out = []
    for node in dg.gm.graph.nodes:
        if node.op != "call_module" or not isinstance(dg.gm.get_submodule(node.target), nn.Linear):
            continue
        ids = dg.values.get(node)
        group = dg.group_of(node.name, len(ids) - 1) if isinstance(ids, list) else None
        if group is None or not group.prunable:
            continue  # the logits layer (frozen: it reaches the output) or an ignored module
        # Paper step 3: saliency of output unit j = ||W[j, :]||_2.
        out.append((str(node.target), "linear", group, _row_norms(dg, group, f"{node.target}.weight")))
    return out


def _field_targets(dg: DependencyGraph, layout: list) -> list[tuple[str, str, Group, np.ndarray]]:
    out = []
    for f in layout:
        node = next((n for n in dg.gm.graph.nodes if n.op == "call_module" and n.target == f.layer), None)
        group = dg.group_of(node.name, 1) if node is not None else None
        if group is None or not group.prunable:
            continue
        # Field importance: ||W[field rows]||_2 over the field's field_size expanded filters.
        out.append((f.layer, "fields", group, _row_norms(dg, group, f"{f.layer}.weight")))
    return out
