"""The public entry point `compress`: trace → annotate → run the recipe's passes → a new module + report.

The caller's model is never modified (tracing works on a copy), and the recipe is validated before any
work starts. `FXSLIM_DUMP=dir` turns on IR dumps when `dump_dir` is not given."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from fxslim.graph.clone import detach_tensors
from fxslim.pass_api import PassContext
from fxslim.pm import PassRecord, run_passes
from fxslim.recipe import load_recipe
from fxslim.trace import trace


@dataclass
class CompressResult:
    module: fx.GraphModule
    report: list[PassRecord]

    def summary(self) -> str:
        """A printable table: one row per pass with params/MACs before → after, time and whether it changed."""
        rows = [(r.name, f"{r.params_before:,} -> {r.params_after:,}", f"{r.macs_before:,} -> {r.macs_after:,}",
                 f"{r.seconds:.2f}", "yes" if r.changed else "no") for r in self.report]
        if self.report:
            first, last = self.report[0], self.report[-1]
            rows.append(("total", _ratio(first.params_before, last.params_after),
                         _ratio(first.macs_before, last.macs_after), f"{sum(r.seconds for r in self.report):.2f}", ""))
        head = ("pass", "params", "MACs", "seconds", "changed")
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(5)]

        def line(row) -> str:
            return "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in
                             enumerate(zip(row, widths, strict=True))).rstrip()

        rule = "-" * len(line(head))
        body = [line(r) for r in rows]
        if self.report:
            body.insert(len(body) - 1, rule)
        return "\n".join([line(head), rule, *body])


def _ratio(before: int, after: int) -> str:
    return f"x{after / before:.3f}" if before else "-"


def compress(
    model: nn.Module,
    example_inputs,
    recipe,
    *,
    data: Iterable | None = None,
    dump_dir: str | Path | None = None,
    seed: int = 0,
) -> CompressResult:
    """Run `recipe` on `model`; returns a CompressResult with a NEW GraphModule (`model` is left untouched)."""
    specs = load_recipe(recipe)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if dump_dir is None and os.environ.get("FXSLIM_DUMP"):
        dump_dir = os.environ["FXSLIM_DUMP"]
    gm = trace(model, inputs)
    # Passes never change their input, so the traced graph itself is the untouched reference (KD teacher).
    ctx = PassContext(example_inputs=inputs, data=data, seed=seed, reference=gm,
                      dump_dir=Path(dump_dir) if dump_dir else None)
    torch.manual_seed(seed)
    module, report = run_passes(gm, specs, ctx, ctx.dump_dir)
    detach_tensors(module, model)
    return CompressResult(module.eval(), report)
