"""The pass manager: runs a recipe's passes in order and owns everything around them.

For each pass it times the run, recomputes params/MACs, checks that the model outputs keep their shapes,
checks the declared symmetry when the model has one (e2cnn models: `gm.meta["group"]`; the logits of an
invariant model must not move under `torch.rot90` of the example input by more than SYMMETRY_ATOL in fp32,
and every layout conv must still hold whole fields), writes the numbered IR dump when asked, and collects one
`PassRecord`. Models that declare no group are checked exactly as before. Passes only transform; a pass that
fails or breaks the graph stops the run with an error naming the pass. This file never changes a graph
itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from fxslim import symmetry
from fxslim.dump import dump_ir
from fxslim.errors import AnalysisError, FxslimError, PassError
from fxslim.graph.cost import Cost, annotate
from fxslim.graph.shape import out_shape
from fxslim.options import check_graph
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
    symmetry_error: float | None = None  # max |f(rot90 x) - f(x)| over the group's rotations, when declared
    cpu_seconds: float = 0.0  # process CPU time of the pass itself (`seconds` is its wall time)
    check_cpu_seconds: float = 0.0  # process CPU time of the checks after it: lint, shapes + cost, symmetry


SYMMETRY_ATOL = 1e-4  # fp32 invariance tolerance on the logits (docs/notes/methods.md, equivariant section)


def output_shapes(gm: fx.GraphModule) -> list:
    """Shapes of the model outputs from the last shape propagation (nested outputs flattened)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [out_shape(a) for a in out.all_input_nodes]


def run_passes(
    gm: fx.GraphModule, specs: list[PassSpec], ctx: PassContext, dump_dir: Path | None = None
) -> tuple[fx.GraphModule, list[PassRecord]]:
    check_graph(specs, gm, ctx.data is not None, registry())  # before any work: names in ignore, data needed
    cost = annotate(gm, ctx.example_inputs)
    want = output_shapes(gm)
    base_error = symmetry_error(gm, ctx.example_inputs)
    if base_error is not None and not base_error < SYMMETRY_ATOL:
        raise AnalysisError(
            f"the input model is not {gm.meta['group']}-invariant on the example inputs (rot90 error "
            f"{base_error:.3g} >= {SYMMETRY_ATOL:g}): use inputs whose size keeps every pooling and stride "
            "symmetric under rotation (e.g. 28x28 with one 2x2 pool, an odd size without strided pooling)"
        )
    previous = _dump(gm, cost, dump_dir, 0, "input", None)
    records = []
    for i, spec in enumerate(specs, start=1):
        t0, c0 = time.perf_counter(), time.process_time()
        result = _run_one(gm, spec, ctx)
        seconds, c1 = time.perf_counter() - t0, time.process_time()
        new_cost = _annotate_after(result.module, spec, ctx)
        got = output_shapes(result.module)
        if got != want:
            raise PassError(f"pass {spec.name!r} changed the model output shapes {want} -> {got}")
        error = _check_symmetry(result, spec, ctx.example_inputs)
        check_cpu = time.process_time() - c1
        records.append(
            PassRecord(
                spec.name,
                dict(spec.options),
                cost.params,
                new_cost.params,
                cost.macs,
                new_cost.macs,
                seconds,
                result.changed,
                result.record,
                error,
                c1 - c0,
                check_cpu,
            )
        )
        ctx.debug(
            "pass %s%s: params %d -> %d, MACs %d -> %d, %.2fs; %s",
            spec.name,
            spec.options or "",
            cost.params,
            new_cost.params,
            cost.macs,
            new_cost.macs,
            seconds,
            result.record,
        )
        previous = _dump(result.module, new_cost, dump_dir, i, spec.name, previous)
        gm, cost = result.module, new_cost
    return gm, records


def _run_one(gm: fx.GraphModule, spec: PassSpec, ctx: PassContext) -> PassResult:
    torch.manual_seed(ctx.seed)
    try:
        result = registry()[spec.name].run(gm, ctx, **spec.options)
    except FxslimError as exc:
        exc.pass_name = exc.pass_name or spec.name  # the pass's schema wrapper names it; this is the fallback
        raise
    except Exception as exc:
        raise PassError(f"pass {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, PassResult) or not isinstance(result.module, fx.GraphModule):
        raise PassError(f"pass {spec.name!r} did not return a PassResult with a GraphModule")
    return result


def symmetry_error(gm: fx.GraphModule, example_inputs: tuple) -> float | None:
    """max over the rotations k of the declared group of |gm(rot90(x, k)) - gm(x)| on the logits (None
    when `gm` declares no group with rot90 elements). Invariant outputs (rank <= 2) only: a spatial output
    would need its fields' channel permutation, which fxslim does not check."""
    ks = symmetry.rotations(gm)
    if not ks:
        return None
    x, *rest = example_inputs
    if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
        raise AnalysisError(
            f"checking {gm.meta['group']} invariance needs a square example input, got {tuple(x.shape)}"
        )
    with torch.no_grad():
        y = gm(x, *rest)
        if not isinstance(y, torch.Tensor) or y.dim() > 2:
            return None
        return max(float((gm(torch.rot90(x, k, (-2, -1)), *rest) - y).abs().max()) for k in ks)


def _check_symmetry(result: PassResult, spec: PassSpec, example_inputs: tuple) -> float | None:
    """Whole fields in every layout conv, then the rot90 check: PassError naming the pass when broken.
    INT8 passes (record {"int8": True}) have their error recorded, not enforced."""
    gm = result.module
    try:
        symmetry.refresh_layout_(gm)
        error = symmetry_error(gm, example_inputs)
    except FxslimError as exc:
        raise PassError(str(exc), pass_name=spec.name) from exc
    if error is not None and not error < SYMMETRY_ATOL and not result.record.get("int8"):
        raise PassError(
            f"pass {spec.name!r} broke the model's {gm.meta['group']} invariance: rot90 of the "
            f"input moves the logits by {error:.3g} (tolerance {SYMMETRY_ATOL:g}); prune whole "
            "fields (equivariant_prune) instead of single channels"
        )
    return error


def _annotate_after(gm: fx.GraphModule, spec: PassSpec, ctx: PassContext) -> Cost:
    try:
        gm.graph.lint()
        return annotate(gm, ctx.example_inputs)
    except Exception as exc:
        raise PassError(f"pass {spec.name!r} produced a graph that does not run: {exc}") from exc


def _dump(
    gm: fx.GraphModule, cost: Cost, dump_dir: Path | None, index: int, name: str, previous: Path | None
) -> Path | None:
    if dump_dir is None:
        return None
    dump_dir.mkdir(parents=True, exist_ok=True)
    return dump_ir(gm, cost, dump_dir / f"{index:03d}_{name}.txt", f"{index:03d} {name}", previous)
