"""The pass manager: runs a recipe's passes in order and owns everything around them.

For each pass it times the run, recomputes params/MACs, checks that the model outputs keep their shapes,
writes the numbered IR dump when asked, and collects one `PassRecord`. Passes only transform; a pass that
fails or breaks the graph stops the run with an error naming the pass. This file never changes a graph
itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from fxslim.dump import dump_ir
from fxslim.errors import FxslimError, PassError
from fxslim.graph.cost import Cost, annotate
from fxslim.pass_api import PassContext, PassResult
from fxslim.recipe import PassSpec, registry


@dataclass
class PassRecord:
    name: str
    options: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float
    changed: bool
    details: dict = field(default_factory=dict)


def output_shapes(gm: fx.GraphModule) -> list:
    """Shapes of the model outputs from the last shape propagation (nested outputs flattened)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    shapes = []
    for a in out.all_input_nodes:
        meta = a.meta.get("tensor_meta")
        shapes.append(tuple(meta.shape) if hasattr(meta, "shape") else None)
    return shapes


def run_passes(gm: fx.GraphModule, specs: list[PassSpec], ctx: PassContext,
               dump_dir: Path | None = None) -> tuple[fx.GraphModule, list[PassRecord]]:
    cost = annotate(gm, ctx.example_inputs)
    want = output_shapes(gm)
    previous = _dump(gm, cost, dump_dir, 0, "input", None)
    records = []
    for i, spec in enumerate(specs, start=1):
        t0 = time.perf_counter()
        result = _run_one(gm, spec, ctx)
        seconds = time.perf_counter() - t0
        new_cost = _annotate_after(result.module, spec, ctx)
        got = output_shapes(result.module)
        if got != want:
            raise PassError(f"pass {spec.name!r} changed the model output shapes {want} -> {got}")
        records.append(PassRecord(spec.name, dict(spec.options), cost.params, new_cost.params, cost.macs,
                                  new_cost.macs, seconds, result.changed, result.record))
        ctx.debug("pass %s%s: params %d -> %d, MACs %d -> %d, %.2fs; %s", spec.name, spec.options or "",
                  cost.params, new_cost.params, cost.macs, new_cost.macs, seconds, result.record)
        previous = _dump(result.module, new_cost, dump_dir, i, spec.name, previous)
        gm, cost = result.module, new_cost
    return gm, records


def _run_one(gm: fx.GraphModule, spec: PassSpec, ctx: PassContext) -> PassResult:
    torch.manual_seed(ctx.seed)
    try:
        result = registry()[spec.name].run(gm, ctx, **spec.options)
    except FxslimError as exc:
        if str(exc).startswith(f"pass {spec.name!r}"):
            raise
        raise type(exc)(f"pass {spec.name!r}: {exc}") from exc
    except Exception as exc:
        raise PassError(f"pass {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, PassResult) or not isinstance(result.module, fx.GraphModule):
        raise PassError(f"pass {spec.name!r} did not return a PassResult with a GraphModule")
    return result


def _annotate_after(gm: fx.GraphModule, spec: PassSpec, ctx: PassContext) -> Cost:
    try:
        gm.graph.lint()
        return annotate(gm, ctx.example_inputs)
    except Exception as exc:
        raise PassError(f"pass {spec.name!r} produced a graph that does not run: {exc}") from exc


def _dump(gm: fx.GraphModule, cost: Cost, dump_dir: Path | None, index: int, name: str,
          previous: Path | None) -> Path | None:
    if dump_dir is None:
        return None
    dump_dir.mkdir(parents=True, exist_ok=True)
    return dump_ir(gm, cost, dump_dir / f"{index:03d}_{name}.txt", f"{index:03d} {name}", previous)
