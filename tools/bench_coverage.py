"""Coverage benchmark over torchvision's classifiers: does fxslim trace, analyze, prune and export each one?

For every classification model in ``torchvision.models`` (random weights, eval mode, batch 1, a small input
the model accepts) it runs ``fxslim.analyze`` and ``fxslim.compress`` with ``prune_channels`` at ratio 0.5,
checks that the pruned GraphModule runs and keeps the output shape, records params/MACs before and after and
the ops the analyzer froze as unsupported, then ``fxslim.export_onnx`` and its onnxruntime parity error
(optionally ORT CPU-time latency before/after, one thread, interleaved A/B, median). A failure is classified
by stage (setup, trace, analysis, rewrite, export; timeout or crash for the subprocess guard) with the first
line of its message; one model failing never stops the run. This tool only measures: it must never change
fxslim or work around a failure inside it.

    python tools/bench_coverage.py --quick [--torch-pruning]                 # 14 models, a few minutes
    python tools/bench_coverage.py --json out/coverage.jsonl --write-md      # all 80 classifiers
    python tools/bench_coverage.py --models resnet18,swin_t --ort-latency
    python tools/bench_coverage.py --recipe '[{"pass": "lowrank_conv", "method": "tucker", "rank": 0.5}]'

`--recipe` replaces the pruning recipe by any recipe whose passes need no data (a JSON list, a TOML file or a
built-in name): the same stages, checks and table for other rewrites.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZE = 64
RATIO = 0.5
DEFAULT_RECIPE = [{"pass": "prune_channels", "ratio": RATIO}]
PRUNING_MD = REPO / "docs/results/coverage.md"  # --write-md's page for the default recipe


@dataclass(frozen=True)
class Special:
    """An input size and/or constructor arguments for a model that rejects the default 1x3x64x64."""

    size: int = DEFAULT_SIZE
    kwargs: dict[str, Any] = field(default_factory=dict)
    why: str = ""


# Every model not listed here is built with `weights=None` only and fed 1x3x64x64 (all accept it; 32 would
# leave 1x1 maps in the last stage of most of them, alexnet rejects 32).
SPECIAL: dict[str, Special] = {
    "inception_v3": Special(96, {}, "needs >= 75x75 (a 3x3 conv sees 2x2 at 64); 96 keeps the default build"),
    "maxvit_t": Special(
        224,
        {},
        "every stage map (input/4 ... input/32) must divide by partition_size=7, "
        "which maxvit_t fixes; 224 = 32*7 is the smallest (input_size= only sizes "
        "the relative-position tables, 64/96/128 fail in window partition)",
    ),
    "vit_b_16": Special(32, {"image_size": 32}, "image_size must equal the input and divide by patch 16: 2x2 patches"),
    "vit_l_16": Special(32, {"image_size": 32}, "image_size must equal the input and divide by patch 16: 2x2 patches"),
    "vit_h_14": Special(28, {"image_size": 28}, "image_size must equal the input and divide by patch 14: 2x2 patches"),
    "vit_b_32": Special(64, {"image_size": 64}, "image_size must equal the input and divide by patch 32: 2x2 patches"),
    "vit_l_32": Special(64, {"image_size": 64}, "image_size must equal the input and divide by patch 32: 2x2 patches"),
}

REPEAT_UNDER_S = 10.0  # --repeat times a tool again only while its runs so far total less than this (CPU s)

MD_LEGEND = (
    "Recipe: {recipe}, random weights (all-zero heads re-drawn), eval, batch 1, input "
    "{size}x{size} unless noted (see `SPECIAL` in the tool). *seconds* = wall time of `fxslim.compress` (trace, "
    "shapes, analysis, pruning, cost recount); *params*/*MACs* = after/before; *onnx err* = max abs "
    "ORT-vs-PyTorch error of the pruned model; *out max* = its max |output| (random-init logits are small, read "
    "the error against it); *#unsup* = ops `fxslim.analyze` left unsupported; *groups* = prunable/total. "
    "*TP* columns (with `--torch-pruning`): the Torch-Pruning package on the same model in the same run "
    "(MagnitudePruner L1, ratio {ratio}, classifier ignored), its status, its process CPU seconds from "
    "dependency-graph build to the end of pruning, and that over fxslim's process CPU seconds: over the whole "
    "fxslim.compress, and over its analysis + pruning (trace, shape propagation, analysis, pruning), i.e. "
    "without the pass manager's checks after the pass (lint, output shapes and cost recount by a second "
    "shape propagation, symmetry), which Torch-Pruning's timed region has no counterpart of. The *fastest of "
    "--repeat* column (with `--repeat N`): the same whole-compress ratio of each tool's fastest of up to N runs "
    "in its warm worker (fxslim: the same call again; Torch-Pruning: a freshly built model each time; the "
    f"repeats stop once the runs so far total {REPEAT_UNDER_S:g} CPU s); the other columns are the first run's."
)

QUICK = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "googlenet",
    "squeezenet1_0",
    "mnasnet0_5",
]


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def spec_of(name: str) -> Special:
    return SPECIAL.get(name, Special())


# ---- one model -------------------------------------------------------------------------------------------


class StageFailure(Exception):
    """A failure at a named stage; carries the original exception's type and message."""

    def __init__(self, stage: str, exc: BaseException, note: str = ""):
        super().__init__(f"{stage}: {exc}")
        self.stage, self.exc, self.note = stage, exc, note


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")[:400]


def _where(exc: BaseException) -> str:
    """The innermost traceback frame inside fxslim/passes (file:line function), where a fix would start."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/fxslim/" in f.filename or "/passes/" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ""
    try:
        rel = Path(f.filename).resolve().relative_to(REPO)
    except ValueError:
        rel = Path(f.filename).name
    return f"{rel}:{f.lineno} {f.name}"


def _stage_of(exc: BaseException, step: str) -> str:
    """Typed fxslim errors name their stage; anything else is charged to the step that was running."""
    import fxslim

    if isinstance(exc, fxslim.TraceError):
        return "trace"
    if isinstance(exc, fxslim.AnalysisError):
        return "analysis"
    if isinstance(exc, fxslim.PassError | fxslim.RecipeError):
        return "rewrite"
    if isinstance(exc, fxslim.ExportError):
        return "export"
    return step


def _repeat_timed(first_cpu_s: float, repeat: int, run) -> tuple[list[float], str | None]:
    """CPU seconds of `run()` (which returns them), up to `repeat` runs in all including the first one
    already timed, while the runs so far total under REPEAT_UNDER_S (long runs are little noisy, and the
    repeats must fit the per-model timeout). A failing repeat ends the repeats and is returned as a message:
    it never undoes the first run's result."""
    runs = [first_cpu_s]
    while len(runs) < repeat and sum(runs) < REPEAT_UNDER_S:
        try:
            runs.append(run())
        except Exception as exc:
            return runs, f"{type(exc).__name__}: {_first_line(str(exc))}"
    return runs, None


def bench_model(
    name: str,
    *,
    ort_latency: bool = False,
    onnx_dir: Path | None = None,
    progress: Path | None = None,
    repeat: int = 1,
    recipe=None,
) -> dict[str, Any]:
    """Run every stage on one model; returns a flat record (also written to `progress` after each step so
    the parent can tell where a timed-out or crashed worker was)."""
    sp = spec_of(name)
    rec: dict[str, Any] = {
        "model": name,
        "input": [1, 3, sp.size, sp.size],
        "kwargs": sp.kwargs,
        "status": "running",
        "stage": "setup",
        "error": None,
    }
    step = _stepper(rec, progress)
    step("setup")
    try:
        _run_stages(name, sp, rec, step, ort_latency, onnx_dir, repeat, recipe)
        rec["status"], rec["stage"] = "ok", ""
    except StageFailure as f:
        rec.update(
            status="fail",
            stage=f.stage,
            error_type=type(f.exc).__name__,
            error=_first_line(f.note or str(f.exc)) or type(f.exc).__name__,
            message=str(f.exc)[:4000],
            where=_where(f.exc),
        )
    if progress is not None:
        progress.write_text(json.dumps(rec))
    return rec


def _stepper(rec: dict, progress: Path | None):
    """`step(stage)`: record the stage being entered, and write the record to `progress` so the parent can
    tell where a worker that timed out or crashed was."""

    def step(stage: str) -> None:
        rec["stage"] = stage
        if progress is not None:
            progress.write_text(json.dumps(rec))

    return step


def _randomize_zero_weights(model) -> list[str]:
    """Give all-zero conv/linear weights small random values. torchvision zero-initialises ViT heads, whose
    logits would then be exactly 0 and make the ONNX parity check vacuous; returns the modules changed."""
    import torch
    from torch import nn

    changed = []
    with torch.no_grad():
        for qual, m in model.named_modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and not bool(m.weight.any()):
                nn.init.normal_(m.weight, std=0.02, generator=torch.Generator().manual_seed(0))
                changed.append(qual)
    return changed


def _run_stages(
    name, sp: Special, rec: dict, step, ort_latency: bool, onnx_dir: Path | None, repeat: int = 1, recipe=None
) -> None:
    import torch
    import torchvision

    import fxslim
    from fxslim.recipe import load_recipe, registry

    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **sp.kwargs).eval()
        rec["reinit"] = _randomize_zero_weights(model)
        x = torch.randn(*rec["input"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = tuple(model(x).shape)
    except Exception as exc:
        raise StageFailure("setup", exc) from exc
    rec["output_shape"] = list(want)

    step("analysis")
    try:
        t0 = time.perf_counter()
        dg = fxslim.analyze(model, (x,))
        rec["analyze_s"] = time.perf_counter() - t0
    except Exception as exc:
        raise StageFailure(_stage_of(exc, "analysis"), exc) from exc
    rec["groups"] = len(dg.groups)
    rec["prunable_groups"] = len(dg.prunable_groups)
    rec["unsupported"] = [{"node": u.node, "target": u.target, "reason": u.reason} for u in dg.unsupported]
    rec["n_unsupported"] = len(dg.unsupported)
    rec["frozen"] = [{"size": g.size, "reason": g.reason} for g in dg.groups if not g.prunable]
    del dg

    step("rewrite")
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    try:
        for spec in load_recipe(recipe):  # importing a pass module is a once-per-process cost, not per-model work
            registry()[spec.name]
        t0, c0 = time.perf_counter(), time.process_time()
        res = fxslim.compress(model, (x,), recipe)
        rec["compress_s"], rec["compress_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    except Exception as exc:
        raise StageFailure(_stage_of(exc, "rewrite"), exc) from exc
    first, last = res.report[0], res.report[-1]
    rec.update(
        params_before=first.params_before,
        params_after=last.params_after,
        macs_before=first.macs_before,
        macs_after=last.macs_after,
        params_ratio=last.params_after / first.params_before if first.params_before else None,
        macs_ratio=last.macs_after / first.macs_before if first.macs_before else None,
        prune_pass_s=sum(r.seconds for r in res.report),
        changed=any(r.changed for r in res.report),
        # The pass manager's checks after the pass (lint, output shapes + cost recount, symmetry): work that
        # Torch-Pruning's timed region has no counterpart of. Analysis + pruning = compress minus these.
        verify_cpu_s=sum(r.check_cpu_seconds for r in res.report),
    )
    rec["analysis_pruning_cpu_s"] = rec["compress_cpu_s"] - rec["verify_cpu_s"]
    if repeat > 1:  # the same call again in this warm process; the first run above stays the headline
        checks: list[float] = [rec["verify_cpu_s"]]

        def again() -> float:
            c = time.process_time()
            again_res = fxslim.compress(model, (x,), recipe)
            checks.append(sum(r.check_cpu_seconds for r in again_res.report))
            return time.process_time() - c

        step("repeat")  # the first run's figures reach the parent even if the repeats are killed
        runs, rec["repeat_error"] = _repeat_timed(rec["compress_cpu_s"], repeat, again)
        rec["compress_cpu_runs"] = runs
        rec["compress_cpu_min_s"] = min(runs)
        rec["analysis_pruning_cpu_min_s"] = min(t - v for t, v in zip(runs, checks, strict=True))
    try:
        with torch.no_grad():
            got = res.module(x)
    except Exception as exc:
        raise StageFailure(
            "rewrite", exc, f"pruned module fails in forward: {type(exc).__name__}: {_first_line(str(exc))}"
        ) from exc
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise StageFailure("rewrite", ValueError(f"pruned output shape {shape} != original {want}"))
    if not bool(torch.isfinite(got).all()):
        raise StageFailure("rewrite", ValueError("pruned module outputs NaN/inf"))
    rec["out_absmax"] = float(got.abs().max())  # the scale the ONNX error should be read against

    step("export")
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(onnx_dir) if onnx_dir else Path(tmp)
        path = where / f"{name}_pruned.onnx"
        try:
            t0 = time.perf_counter()
            rec["onnx_err"] = float(fxslim.export_onnx(res.module, (x,), path))
            rec["export_s"] = time.perf_counter() - t0
        except Exception as exc:
            raise StageFailure(_stage_of(exc, "export"), exc) from exc
        if ort_latency:
            step("ort-latency")
            try:  # a latency failure is reported, but it is not a coverage failure
                from fxslim.export import ort_latency as measure_latency

                base = where / f"{name}_original.onnx"
                fxslim.export_onnx(model, (x,), base)
                t = measure_latency({"before": base, "after": path}, (x,))
                rec.update(
                    ort_ms_before=t["before"] * 1e3, ort_ms_after=t["after"] * 1e3, ort_ratio=t["after"] / t["before"]
                )
            except Exception as exc:
                rec["ort_error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"


def bench_torch_pruning(name: str, *, progress: Path | None = None, repeat: int = 1) -> dict[str, Any]:
    """The same job with the Torch-Pruning package (the peer): its L1 MagnitudePruner at ratio 0.5 with the
    classifier layers ignored (its documented usage), timed from dependency-graph build to the end of
    pruning; then forward, output shape, params/MACs (fxslim's counter, for both) and ONNX parity."""
    import torch
    import torch_pruning as tp
    import torchvision
    from torch import nn

    import fxslim

    sp = spec_of(name)
    rec: dict[str, Any] = {"status": "running", "stage": "setup", "error": None}
    step = _stepper(rec, progress)
    step("setup")

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **sp.kwargs).eval()
        _randomize_zero_weights(model)
        return model

    def prune(model: nn.Module) -> tuple[float, float]:
        """Torch-Pruning on `model` in place; returns its process CPU and wall seconds."""
        heads = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
                 and getattr(m, "out_features", getattr(m, "out_channels", None)) == want[-1]]
        t0, c0 = time.perf_counter(), time.process_time()
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=RATIO, ignored_layers=heads)
        pruner.step()
        return time.process_time() - c0, time.perf_counter() - t0

    try:
        model = build()
        x = torch.randn(1, 3, sp.size, sp.size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = tuple(model(x).shape)
        before = fxslim.count(model, (x,))
        step("prune")
        rec["cpu_s"], rec["seconds"] = prune(model)
        step("forward")
        with torch.no_grad():
            got = model(x)
        if tuple(got.shape) != want:
            raise ValueError(f"pruned output shape {tuple(got.shape)} != original {want}")
        after = fxslim.count(model, (x,))
        rec.update(params_ratio=after.params / before.params, macs_ratio=after.macs / before.macs)
        step("export")
        with tempfile.TemporaryDirectory() as tmp:
            rec["onnx_err"] = float(fxslim.export_onnx(model, (x,), Path(tmp) / "tp.onnx"))
        if repeat > 1:  # again on a freshly built model each time, in this warm process
            del model, got
            step("repeat")
            rec["cpu_runs"], rec["repeat_error"] = _repeat_timed(rec["cpu_s"], repeat, lambda: prune(build())[0])
            rec["cpu_min_s"] = min(rec["cpu_runs"])
        rec["status"], rec["stage"] = "ok", ""
    except Exception as exc:
        rec.update(status="fail", error=f"{type(exc).__name__}: {_first_line(str(exc))}")
    if progress is not None:
        progress.write_text(json.dumps(rec))
    return rec


# ---- subprocess guard ------------------------------------------------------------------------------------


def run_isolated(name: str, timeout: float, ort_latency: bool, onnx_dir: Path | None, threads: int,
                 peer: bool = False, repeat: int = 1, recipe: str | None = None) -> dict:
    """Run one model in a fresh interpreter, killed after `timeout` seconds (a slow or crashing model
    cannot block or take down the run; memory of huge models is returned to the OS in between)."""
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker-peer" if peer else "--worker",
            name,
            "--progress",
            str(progress),
            "--threads",
            str(threads),
            "--repeat",
            str(repeat),
        ]
        if ort_latency:
            cmd.append("--ort-latency")
        if onnx_dir:
            cmd += ["--onnx-dir", str(onnx_dir)]
        if recipe is not None:
            cmd += ["--recipe", recipe]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            err_tail, rc, timed_out = proc.stderr.strip().splitlines()[-3:], proc.returncode, False
        except subprocess.TimeoutExpired:
            err_tail, rc, timed_out = [], None, True
        wall = time.perf_counter() - t0
        rec = json.loads(progress.read_text()) if progress.exists() else {"model": name, "stage": "setup"}
    rec.setdefault("model", name)
    rec["wall_s"] = wall
    if timed_out:
        rec.update(
            status="fail",
            error_type="Timeout",
            error=f"timed out after {timeout:.0f} s during stage {rec.get('stage')!r}",
            stage=f"timeout/{rec.get('stage')}",
        )
    elif rec.get("status") != "ok" and rec.get("status") != "fail":
        rec.update(
            status="fail",
            error_type="Crash",
            stage=f"crash/{rec.get('stage')}",
            error=f"worker exited with code {rc} during stage {rec.get('stage')!r}: " + " | ".join(err_tail)[:400],
        )
    return rec


# ---- reporting -------------------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = ["model", "input", "status", "stage", "seconds", "params", "MACs", "onnx err", "out max", "#unsup", "groups"]


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    repeated = _any_repeated(records)
    for r in records:
        groups = f"{r['prunable_groups']}/{r['groups']}" if "groups" in r else "-"
        rows.append(
            [
                r["model"],
                str(r["input"][-1]) if "input" in r else "-",
                r["status"],
                r.get("stage") or "",
                _fmt(r.get("compress_s"), ".2f"),
                _fmt(r.get("params_ratio"), ".3f"),
                _fmt(r.get("macs_ratio"), ".3f"),
                _fmt(r.get("onnx_err"), ".1e"),
                _fmt(r.get("out_absmax"), ".1e"),
                _fmt(r.get("n_unsupported"), "d"),
                groups,
            ]
        )
        if any("ort_ratio" in q for q in records):
            rows[-1].append(_fmt(r.get("ort_ratio"), ".3f"))
        if any("tp" in q for q in records):
            tp = r.get("tp", {})
            rows[-1] += [tp.get("status", "-") + (f" [{tp['stage']}]" if tp.get("status") == "fail" else ""),
                         _fmt(tp.get("cpu_s"), ".2f"), _fmt(_speedup(r), ".1f"),
                         _fmt(_speedup(r, "analysis_pruning_cpu_s"), ".1f")]
            if repeated:
                rows[-1].append(_fmt(_speedup_min(r), ".1f"))
    return rows


def _speedup(r: dict, ours: str = "compress_cpu_s", theirs: str = "cpu_s") -> float | None:
    """Torch-Pruning's time (dependency-graph build + pruning) over fxslim's, in process CPU seconds (one
    thread; wall time on a shared machine measures the neighbours). `ours`: "compress_cpu_s" (the whole
    fxslim.compress: trace, shapes, analysis, pruning, then the pass manager's checks and cost recount) or
    "analysis_pruning_cpu_s" (the same without those checks: trace, shapes, analysis, pruning); the `_min_s`
    variants with theirs="cpu_min_s" compare the minima over --repeat runs."""
    tp = r.get("tp", {})
    if r.get("status") != "ok" or tp.get(theirs) is None or not r.get(ours):
        return None
    return tp[theirs] / r[ours]


def _speedup_min(r: dict, ours: str = "compress_cpu_min_s") -> float | None:
    return _speedup(r, ours, "cpu_min_s")


PEER_COLUMNS = ["TP status", "TP cpu s", "TP / fxslim cpu", "TP / fxslim analysis+pruning"]
REPEAT_COLUMN = "TP / fxslim cpu, fastest of --repeat"


def summary_of(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    secs = [r["compress_s"] for r in records if r.get("compress_s") is not None]
    stages = Counter(r["stage"] for r in records if r["status"] != "ok")
    return {
        "summary": True,
        "ok": len(ok),
        "total": len(records),
        "failed_by_stage": dict(stages),
        "median_compress_s": statistics.median(secs) if secs else None,
        "median_analyze_s": statistics.median([r["analyze_s"] for r in records if "analyze_s" in r] or [0]),
        "wall_s": wall,
        **_peer_summary(records),
    }


def _peer_summary(records: list[dict]) -> dict:
    peers = [r for r in records if "tp" in r]
    if not peers:
        return {}
    both = [r for r in peers if r["status"] == "ok" and r["tp"].get("status") == "ok"]
    tp_secs = [r["tp"]["cpu_s"] for r in peers if r["tp"].get("cpu_s") is not None]
    ours = [r["compress_cpu_s"] for r in both]
    return {
        "tp_ok": sum(r["tp"].get("status") == "ok" for r in peers),
        "tp_failed_by_stage": dict(Counter(r["tp"]["stage"] for r in peers if r["tp"].get("status") != "ok")),
        "median_tp_s": statistics.median(tp_secs) if tp_secs else None,
        "median_compress_s_both_ok": statistics.median(ours) if ours else None,
        "median_tp_s_both_ok": statistics.median([r["tp"]["cpu_s"] for r in both]) if both else None,
        "median_speedup_both_ok": statistics.median([_speedup(r) for r in both]) if both else None,
        "median_speedup_analysis_pruning": (
            statistics.median([_speedup(r, "analysis_pruning_cpu_s") for r in both])
            if both and all(r.get("analysis_pruning_cpu_s") for r in both)
            else None
        ),
        "speedup": {r["model"]: _speedup(r) for r in peers if _speedup(r) is not None},
        **_min_summary(both),
    }


def _min_summary(both: list[dict]) -> dict:
    """Medians of the ratio of minima, over the models where both tools were timed more than once."""
    rs = [r for r in both if _speedup_min(r) is not None]
    if not rs:
        return {}
    return {
        "repeated": len(rs),
        "median_speedup_min": statistics.median([_speedup_min(r) for r in rs]),
        "median_speedup_analysis_pruning_min": statistics.median(
            [_speedup_min(r, "analysis_pruning_cpu_min_s") for r in rs]
        ),
    }


def _columns(records: list[dict]) -> list[str]:
    return (COLUMNS + (["ORT ratio"] if any("ort_ratio" in r for r in records) else [])
            + (PEER_COLUMNS if any("tp" in r for r in records) else [])
            + ([REPEAT_COLUMN] if _any_repeated(records) else []))


def _any_repeated(records: list[dict]) -> bool:
    return any("tp" in r for r in records) and any("compress_cpu_min_s" in r for r in records)


def text_table(records: list[dict]) -> str:
    cols = _columns(records)
    rows = [cols] + table_rows(records)
    width = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def failures_text(records: list[dict], md: bool = False) -> list[str]:
    out = []
    for r in records:
        if r["status"] == "ok":
            continue
        where = f" ({r['where']})" if r.get("where") else ""
        if md:
            out.append(f"- **{r['model']}** — {r['stage']}: `{r.get('error_type')}`: {r['error']}{where}")
        else:
            out.append(f"  {r['model']:<22} {r['stage']:<10} {r.get('error_type')}: {r['error']}{where}")
    return out


def unsupported_counts(records: list[dict]) -> Counter:
    """How many models leave each op target unsupported (targets counted once per model)."""
    c: Counter = Counter()
    for r in records:
        c.update({u["target"] for u in r.get("unsupported", [])})
    return c


def summary_text(s: dict) -> str:
    med = _fmt(s["median_compress_s"], ".2f")
    stages = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_stage"].items())) or "none"
    text = (
        f"recipe {recipe_text(s.get('recipe'))}: {s['ok']} OK of {s['total']} models; failures by stage: {stages}; "
        f"median fxslim.compress {med} s; wall {s['wall_s']:.0f} s"
    )
    if "tp_ok" in s:
        tp_stages = ", ".join(f"{k}: {v}" for k, v in sorted(s["tp_failed_by_stage"].items())) or "none"
        text += (
            f". Torch-Pruning in the same run: {s['tp_ok']} OK of {s['total']} (failures: {tp_stages}); on the "
            f"models both handle, median CPU seconds fxslim {_fmt(s['median_compress_s_both_ok'], '.2f')} vs "
            f"Torch-Pruning {_fmt(s['median_tp_s_both_ok'], '.2f')}, median per-model ratio TP/fxslim "
            f"{_fmt(s['median_speedup_both_ok'], '.2f')} (whole compress) and "
            f"{_fmt(s.get('median_speedup_analysis_pruning'), '.2f')} (analysis + pruning, without the pass "
            "manager's checks)"
        )
    if "median_speedup_min" in s:
        text += (
            f"; the same ratio of each tool's fastest of --repeat runs in its warm process ({s['repeated']} "
            f"models): {s['median_speedup_min']:.2f} (whole compress) and "
            f"{s['median_speedup_analysis_pruning_min']:.2f} (analysis + pruning)"
        )
    return text


def _is_output(group: dict) -> bool:
    return str(group.get("reason")).startswith("reaches the model output")


def recipe_text(recipe: str | None) -> str:
    return f"`prune_channels` ratio {RATIO}" if recipe is None else f"`{recipe}`"


def write_markdown(path: Path, records: list[dict], s: dict, argv: list[str]) -> None:
    import torch
    import torchvision

    cols = _columns(records)
    lines = [
        "# fxslim coverage on torchvision classifiers",
        "",
        f"Command: `{shlex.join(['python', 'tools/bench_coverage.py', *argv])}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"{s.get('threads', 1)} torch thread(s); fxslim at commit {code_version()}.",
        "",
        MD_LEGEND.format(recipe=recipe_text(s.get("recipe")), ratio=RATIO, size=DEFAULT_SIZE),
        "",
        f"**{summary_text(s)}**",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(cols))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    fails = failures_text(records, md=True)
    lines += ["", "## Failures (stage: first line of the message)", ""] + (fails or ["none"])
    unsup = unsupported_counts(records)
    if unsup:
        lines += ["", "## Unsupported ops (number of models)", ""]
        lines += [f"- `{t}`: {n}" for t, n in unsup.most_common()]
    per_model = [
        f"- {r['model']}: "
        + ", ".join(f"`{t}` x{n}" for t, n in Counter(u["target"] for u in r["unsupported"]).most_common())
        for r in records
        if r.get("unsupported")
    ]
    if per_model:
        lines += ["", "## Unsupported ops per model (target x count)", ""] + per_model
    frozen = [
        f"- {r['model']}: " + "; ".join(f"{g['size']} ch: {g['reason']}" for g in r["frozen"] if not _is_output(g))
        for r in records
        if any(not _is_output(g) for g in r.get("frozen", []))
    ]
    if frozen:
        lines += ["", "## Frozen groups other than the model output (channels: reason)", ""] + frozen
    special = [
        f"- {m}: input {sp.size}x{sp.size}" + (f", `{sp.kwargs}`" if sp.kwargs else "") + f" — {sp.why}"
        for m, sp in SPECIAL.items()
        if any(r["model"] == m for r in records)
    ]
    if special:
        lines += ["", "## Special inputs", ""] + special
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---- driver ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"the representative subset: {', '.join(QUICK)}")
    p.add_argument("--models", help="comma-separated model names (default: all torchvision classifiers)")
    p.add_argument("--json", type=Path, help="append one JSON line per model plus a summary line to this file")
    p.add_argument(
        "--write-md",
        nargs="?",
        const=PRUNING_MD,
        type=Path,
        help="write the markdown table (default docs/results/coverage.md)",
    )
    p.add_argument("--ort-latency", action="store_true", help="also time ORT CPU latency before/after")
    p.add_argument(
        "--per-model-timeout",
        type=float,
        default=300.0,
        help="seconds per model in its own subprocess; 0 runs everything in this process",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--onnx-dir", type=Path, help="keep the ONNX files here (default: a temp dir, deleted)")
    p.add_argument(
        "--torch-pruning",
        action="store_true",
        help="also run the Torch-Pruning package on each model in the same run (make bench-install)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        help="seconds per model for Torch-Pruning (default 300; 60 with --quick, so that its time-out on Swin-T "
        "keeps the quick run within a few minutes)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each tool this many times per model in its warm worker process (fxslim: the same compress; "
        f"Torch-Pruning: a freshly built model each time) while the runs total under {REPEAT_UNDER_S:g} CPU s; the "
        "tables then add the ratio of the minima next to the first run's",
    )
    p.add_argument(
        "--recipe",
        help="run this recipe instead of prune_channels ratio 0.5: a JSON list of passes, a TOML file or a built-in "
        "name; its passes get no calibration data",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-peer", help=argparse.SUPPRESS)
    p.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_timeout is None:
        args.peer_timeout = 60.0 if args.quick else 300.0
    if args.recipe is not None:
        if args.torch_pruning:
            p.error("--torch-pruning compares channel pruning: it runs with the default recipe only")
        if args.write_md == PRUNING_MD:
            p.error(f"--recipe: give --write-md a path ({PRUNING_MD.relative_to(REPO)} is the pruning recipe's page)")
        try:
            recipe_of(args)
        except json.JSONDecodeError as exc:
            p.error(f"--recipe is not a valid JSON list: {exc}")
    return args


def recipe_of(args: argparse.Namespace):
    """The recipe --recipe names (a JSON list is parsed here; a path or built-in name is resolved by
    fxslim.load_recipe), or None for the default pruning recipe."""
    if args.recipe is None:
        return None
    text = args.recipe.strip()
    return json.loads(text) if text.startswith("[") else text


def _import_checkout() -> None:
    """Import fxslim and fxslim.passes (pyproject maps it to passes/) from the checkout this file lives in,
    so that running a snapshot of the repo measures the snapshot, not the editable install's tree."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    import fxslim

    if Path(fxslim.__file__).resolve().parent != REPO / "fxslim":
        raise SystemExit(f"fxslim was imported from {fxslim.__file__}, not from {REPO}")
    if "fxslim.passes" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fxslim.passes", REPO / "passes" / "__init__.py", submodule_search_locations=[str(REPO / "passes")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fxslim.passes"] = mod
        spec.loader.exec_module(mod)
        fxslim.passes = mod


def code_version() -> str:
    """Commit of the measured checkout, with `+dirty` when fxslim/ or passes/ differ from it."""

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "fxslim", "passes") else "")) or "unknown"
    except OSError:
        return "unknown"


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    _import_checkout()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        _quiet()
        bench_model(args.worker, ort_latency=args.ort_latency, onnx_dir=args.onnx_dir, progress=args.progress,
                    repeat=args.repeat, recipe=recipe_of(args))
        return 0
    if args.worker_peer:
        _quiet()
        bench_torch_pruning(args.worker_peer, progress=args.progress, repeat=args.repeat)
        return 0
    if args.torch_pruning:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("--torch-pruning needs the Torch-Pruning package: make bench-install", file=sys.stderr)
            return 2

    from tqdm import tqdm

    known = all_models()
    names = args.models.split(",") if args.models else QUICK if args.quick else known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown models: {unknown}; valid: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.onnx_dir:
        args.onnx_dir.mkdir(parents=True, exist_ok=True)
    if args.repeat < 1:
        print(f"--repeat must be >= 1, got {args.repeat}", file=sys.stderr)
        return 2
    if args.per_model_timeout <= 0:
        _quiet()
    records: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(names, unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        if args.per_model_timeout > 0:
            rec = run_isolated(name, args.per_model_timeout, args.ort_latency, args.onnx_dir, args.threads,
                               repeat=args.repeat, recipe=args.recipe)
        else:
            t0 = time.perf_counter()
            rec = bench_model(name, ort_latency=args.ort_latency, onnx_dir=args.onnx_dir, repeat=args.repeat,
                              recipe=recipe_of(args))
            rec["wall_s"] = time.perf_counter() - t0
        if args.torch_pruning:
            rec["tp"] = run_isolated(name, args.peer_timeout, False, None, args.threads, peer=True,
                                     repeat=args.repeat)
        records.append(rec)
        tqdm.write(
            f"{name}: {rec['status']}"
            + (f" [{rec['stage']}] {rec['error']}" if rec["status"] != "ok" else f" {rec.get('compress_s', 0):.2f} s")
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
    bar.close()
    s = summary_of(records, time.perf_counter() - t_start)
    s["threads"] = args.threads
    s["recipe"] = args.recipe
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps(s) + "\n")
    print()
    print(text_table(records))
    fails = failures_text(records)
    if fails:
        print("\nfailures (stage: first line of the message):")
        print("\n".join(fails))
    unsup = unsupported_counts(records)
    if unsup:
        print("\nunsupported ops (number of models): " + ", ".join(f"{t} ({n})" for t, n in unsup.most_common()))
    print("\n" + summary_text(s))
    if args.write_md:
        write_markdown(args.write_md, records, s, argv)
        print(f"wrote {args.write_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
