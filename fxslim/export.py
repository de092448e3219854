"""ONNX export and ONNX Runtime checks: write a model (nn.Module or GraphModule) to an ONNX file, prove with
onnxruntime that the file computes what PyTorch computes, and optionally turn it into a static INT8 QDQ model
calibrated on user data. It is the last stage of the pipeline and only reads the model: it must never change
a module's parameters, buffers or structure, never leave a module in a different train/eval state than it
found it, and never hand back a file that was not checked against PyTorch.

Exporter choice (measured on 2 shared cores, torch 2.14.1, random weights, 1x3x64x64, A/B interleaved): the
TorchScript exporter (``dynamo=False``) wrote resnet18 in 0.4-0.8 s and its fx GraphModule in 0.4-0.6 s, the
torch.export one (``dynamo=True``) took 3.6-7.7 s and 3.3-4.7 s, with the same parity (<3e-5) on the six
torchvision models of tests/test_export.py, plain and traced.
TorchScript is tried first, with its deprecation warning silenced; torch.export is the fallback. Because a
TorchScript trace can silently bake input-dependent values into constants (``.numpy()``, ``.item()``),
every file is also checked on a perturbed copy of the float inputs; an exporter that raises or whose file
disagrees with PyTorch counts as failed and the next one is tried. Shapes are static: the batch dimension of
the example inputs is baked in (calibration batches are cut to that size), which keeps ``quant_pre_process``
shape inference and ORT's QDQ fusion simple.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fxslim.errors import ExportError
from fxslim.module_state import eval_mode
from fxslim.quiet import quiet

log = logging.getLogger(__name__)

EXPORTER_ORDER: tuple[str, ...] = ("torchscript", "dynamo")
QUANTIZE_MODES: tuple[str | None, ...] = (None, "int8")
# Activation-range calibration of static INT8 (onnxruntime's CalibrationMethod): "minmax" takes the observed
# range, "percentile" clips it at the 99.999th percentile of |x|, "entropy" picks the range that keeps the
# KL divergence of the quantized histogram smallest.
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "entropy")

# ONNX protobuf files cannot exceed 2 GiB; above this the dynamo exporter must write weights externally.
_INLINE_WEIGHT_LIMIT = 1_800_000_000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QUANT_OPS = re.compile(r"^(Q[A-Z]\w*|QuantizeLinear|DequantizeLinear|DynamicQuantize\w*|\w*Integer(ToFloat)?\w*)$")


@dataclass
class ExportReport:
    """What one export did. ``max_abs_error`` is the fp32 parity error, or the int8 drift when quantized."""

    path: Path
    exporter: str
    max_abs_error: float
    fp32_path: Path
    fp32_error: float
    seconds: float
    quantize: str | None = None
    quantized_ops: dict[str, int] = field(default_factory=dict)
    fp32_nodes: list[str] = field(default_factory=list)  # nodes kept fp32 in the INT8 file (fp32_modules)
    failed_attempts: list[str] = field(default_factory=list)


class OrtModule(nn.Module):
    """A torch module that runs an ONNX model (e.g. the static INT8 one) in onnxruntime, one intra-op thread.

    It holds the file's bytes, so it deep-copies and pickles (the session is rebuilt). The ONNX file has the
    static batch size of its example inputs: other batch sizes are cut into pieces of that size (the last
    one padded with its own first rows and trimmed). Outputs are float tensors on the CPU; no gradient."""

    def __init__(self, onnx_bytes: bytes, batch_size: int) -> None:
        super().__init__()
        self.onnx_bytes, self.batch_size = onnx_bytes, batch_size
        self._session: ort.InferenceSession | None = None

    def session(self) -> ort.InferenceSession:
        if self._session is None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])
        return self._session

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        b, n = self.batch_size, inputs[0].shape[0]
        pieces: list[list[np.ndarray]] = []
        for start in range(0, n, b):
            chunk = [x[start : start + b] for x in inputs]
            short = b - chunk[0].shape[0]
            if short:
                chunk = [torch.cat([c, c[:1].expand(short, *c.shape[1:])]) for c in chunk]
            outs = ort_run(self.session(), chunk)
            pieces.append([o[: b - short] for o in outs])
        outs = [torch.from_numpy(np.concatenate([p[i] for p in pieces])) for i in range(len(pieces[0]))]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"{len(self.onnx_bytes):,} bytes, batch_size={self.batch_size}"


def ort_session(
    path: str | Path, threads: int = 1, *, optimized_model_path: str | Path | None = None
) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads (1 gives the most stable timings).

    ``optimized_model_path`` makes ORT write the graph it will actually run (after its fusions) there.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ORT logs hardware-specific-layout warnings when saving the optimized graph
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_profile(path: str | Path, inputs: Any, *, runs: int = 100) -> dict[str, Any]:
    """Where onnxruntime's time goes (one intra-op thread): its own profiler over `runs` runs after a warm-up.

    Returns {"run_us": mean µs per run, "ops_us": {op type: mean µs per run in its kernels}, "kernel_us": their
    sum, "overhead_us": run_us - kernel_us (dispatch, allocation and copies between kernels), "nodes": node
    count}. A model whose kernels are tiny spends most of a run in that overhead, which fewer MACs cannot cut.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(5):
            ort_run(session, inputs)
        start = time.perf_counter_ns() // 1000
        for _ in range(runs):
            ort_run(session, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    t0 = min(e["ts"] for e in events if e.get("name") == "model_run") if events else 0
    measured = [e for e in events if e.get("ts", 0) >= t0]
    runs_seen = [e for e in measured if e.get("name") == "model_run"][-runs:]
    first = runs_seen[0]["ts"] if runs_seen else start
    ops: dict[str, float] = {}
    nodes = set()
    for e in measured:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"] / max(len(runs_seen), 1)
            nodes.add(e["name"])
    run_us = float(np.mean([e["dur"] for e in runs_seen])) if runs_seen else float("nan")
    kernel_us = float(sum(ops.values()))
    return {"run_us": run_us, "ops_us": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "kernel_us": kernel_us,
            "overhead_us": run_us - kernel_us, "nodes": len(nodes)}


def ort_run(session: ort.InferenceSession, inputs: Any) -> list[np.ndarray]:
    """Run ``session`` on ``inputs`` (a tensor/array or a sequence of them, in the model's input order)."""
    arrays = [_to_numpy(x) for x in _as_tuple(inputs)]
    feeds = session.get_inputs()
    if len(arrays) != len(feeds):
        raise ExportError(
            f"the ONNX model takes {len(feeds)} inputs ({', '.join(f.name for f in feeds)}) "
            f"but {len(arrays)} were given"
        )
    return session.run(None, {f.name: a for f, a in zip(feeds, arrays, strict=True)})


def ort_latency(
    paths: dict[str, str | Path], inputs: Any, *, budget_s: float = 3.0, min_samples: int = 7, max_samples: int = 201
) -> dict[str, float]:
    """Median process CPU seconds of one run of each ONNX file on `inputs`, one intra-op thread.

    The files run interleaved (A B C, then C B A, ...) so that machine drift hits all of them alike, and
    each sample times enough back-to-back runs (at least ~2 ms of CPU) to rise above the timer resolution.
    Process CPU time with one thread varied by about ±2% between runs here, where wall-time ratios did
    not (docs/notes/facts.md). The number of samples is chosen to fit `budget_s`."""
    sessions = {name: ort_session(path, threads=1) for name, path in paths.items()}
    for s in sessions.values():  # warm-up: the first runs allocate buffers and pick kernels
        ort_run(s, inputs)
        ort_run(s, inputs)
    t0 = time.process_time()
    for s in sessions.values():
        ort_run(s, inputs)
    round_s = max(time.process_time() - t0, 1e-6)
    inner = max(1, int(0.002 / (round_s / len(sessions))))
    reps = int(min(max_samples, max(min_samples, budget_s / (round_s * inner))))
    names = list(sessions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.process_time()
            for _ in range(inner):
                ort_run(sessions[name], inputs)
            samples[name].append((time.process_time() - t0) / inner)
    return {name: float(np.median(v)) for name, v in samples.items()}


def op_counts(path: str | Path, *, optimized: bool = True) -> dict[str, int]:
    """Count node op types of an ONNX file; with ``optimized`` count the graph ORT runs after its fusions."""
    if not optimized:
        return _count_ops(onnx.load(str(path), load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_model_path=opt)
        return _count_ops(onnx.load(str(opt), load_external_data=False))


def quantized_op_counts(path: str | Path) -> dict[str, int]:
    """Count the quantized ops (QLinear*, QuantizeLinear, DequantizeLinear, ConvInteger, QGemm, ...) that
    ORT really runs for the model at ``path``.

    A QDQ file only holds float ops wrapped in QuantizeLinear/DequantizeLinear pairs; ORT fuses them into
    QLinearConv, QLinearAdd, ... when it builds a session, and leaves the pairs where it cannot (those ops
    then run in fp32 with extra conversions). So the counts come from the optimized graph ORT writes
    through ``SessionOptions.optimized_model_filepath``, not from the file itself.
    """
    return {op: n for op, n in op_counts(path).items() if _QUANT_OPS.match(op)}


def export_onnx(module: nn.Module, example_inputs: Any, path: str | Path, **options: Any) -> float:
    """Write ``module`` to ``path`` as ONNX, check it in onnxruntime, return the max abs error vs PyTorch.
    ``options`` are ``export_report``'s: quantize, calib_data, calibration, fp32_modules, atol, rtol, opset.

    ``quantize="int8"`` writes the fp32 file to ``<stem>.fp32.onnx`` next to ``path`` and a static QDQ INT8
    model (per-channel QInt8 weights, QUInt8 activations) calibrated on ``calib_data`` (tensors or (x, y)
    batches; the example inputs when None) to ``path``, its activation ranges chosen by ``calibration``
    (one of ``CALIBRATIONS``), and returns the int8 drift instead (not checked against the tolerance).
    ``fp32_modules`` names modules (qualified names, e.g. ``"features.0"``) whose ONNX nodes stay fp32 in the
    INT8 file (onnxruntime's ``nodes_to_exclude``): a first conv on raw pixels is the usual one.
    Raises ExportError when export fails or fp32 parity exceeds
    ``atol + rtol * max|ref|`` for some output. See ``export_report`` for the exporter used and timings.

    The file has the static input shapes of ``example_inputs`` (batch size included). The PyTorch
    reference runs on the module's own device; on CUDA, TF32 convolutions can exceed the default rtol.
    """
    return export_report(module, example_inputs, path, **options).max_abs_error


def export_report(
    module: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    quantize: str | None = None,
    calib_data: Iterable[Any] | None = None,
    calibration: str = "percentile",
    fp32_modules: Iterable[str] = (),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
) -> ExportReport:
    """``export_onnx`` returning the full ExportReport (exporter used, fp32 error, int8 op counts, time)."""
    if quantize not in QUANTIZE_MODES:
        raise ExportError(f"unknown quantize={quantize!r}; valid values: {', '.join(map(repr, QUANTIZE_MODES))}")
    if calibration not in CALIBRATIONS:
        raise ExportError(f"unknown calibration={calibration!r}; valid values: {', '.join(CALIBRATIONS)}")
    fp32_modules = [fp32_modules] if isinstance(fp32_modules, str) else list(fp32_modules)
    if fp32_modules and quantize != "int8":
        raise ExportError(f"fp32_modules={fp32_modules!r} only applies with quantize='int8'")
    start = time.perf_counter()
    inputs = _check_inputs(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp32_path = path if quantize is None else path.with_name(path.stem + ".fp32.onnx")
    name = type(module).__name__
    with eval_mode(module), torch.no_grad():
        try:
            ref = _flat_outputs(module(*inputs))
        except Exception as exc:
            raise ExportError(f"{name} fails in PyTorch on the example inputs: {_summary(exc)}") from exc
        checks = [("on the example inputs", inputs, ref)]
        moved = _perturbed(inputs)
        with contextlib.suppress(Exception):  # a model may reject other values (masks, ids); then skip
            checks.append(("on perturbed inputs", moved, _flat_outputs(module(*moved))))
    with eval_mode(module):
        # Not under no_grad: there nn.MultiheadAttention takes its fused fast path, which TorchScript
        # cannot export (aten::_native_multi_head_attention, seen on vit_b_16).
        exporter, error, failures = _export_checked(module, inputs, fp32_path, opset, checks, atol, rtol)
    report = ExportReport(path, exporter, error, fp32_path, error, 0.0, quantize, failed_attempts=failures)
    if quantize == "int8":
        report.fp32_nodes = _quantize_int8(fp32_path, path, inputs, calib_data, name, calibration, fp32_modules)
        with tempfile.TemporaryDirectory() as tmp:
            opt = Path(tmp) / "optimized.onnx"
            session = ort_session(path, optimized_model_path=opt)
            report.max_abs_error = max(_errors(ref, ort_run(session, inputs), name), default=0.0)
            optimized = onnx.load(str(opt), load_external_data=False)
            ops = _count_ops(optimized)
        _check_still_float(optimized, report.fp32_nodes, name)
        report.quantized_ops = {op: n for op, n in ops.items() if _QUANT_OPS.match(op)}
    report.seconds = time.perf_counter() - start
    log.debug("exported %s with %s in %.2f s, error %.3g", name, exporter, report.seconds, report.max_abs_error)
    return report


def _export_checked(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None,
    checks: list[tuple[str, tuple[torch.Tensor, ...], list[torch.Tensor]]],
    atol: float,
    rtol: float,
) -> tuple[str, float, list[str]]:
    """Try each exporter in EXPORTER_ORDER until one writes a file that passes every parity check."""
    name = type(module).__name__
    failures: list[str] = []
    for exporter in EXPORTER_ORDER:
        try:
            _EXPORTERS[exporter](module, inputs, path, opset)
            session = ort_session(path)
            errors = [_parity(session, x, ref, atol, rtol, f"{name}, {what}") for what, x, ref in checks]
        except Exception as exc:  # any exporter or ORT failure means: try the next exporter
            failures.append(f"{exporter} exporter: {_summary(exc)}")
            log.debug("export of %s with %s failed: %s", name, exporter, failures[-1])
            continue
        return exporter, errors[0], failures
    raise ExportError(f"could not export {name} to ONNX: " + "; ".join(failures))


def _export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int | None) -> None:
    with warnings.catch_warnings():
        # Deprecated but 8-10x faster here; the warnings name the exporter, not a problem in the model.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        # TracerWarnings also fire on benign shape asserts (60 on vit_b_16); the perturbed-input parity
        # check is what catches a trace that baked data into constants.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset)


def _export_dynamo(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int | None) -> None:
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=True,
        verbose=False,
        opset_version=opset,
        external_data=weight_bytes > _INLINE_WEIGHT_LIMIT,
    )


_EXPORTERS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _parity(
    session: ort.InferenceSession,
    inputs: tuple[torch.Tensor, ...],
    ref: list[torch.Tensor],
    atol: float,
    rtol: float,
    name: str,
) -> float:
    """Max abs error of ORT vs ``ref``; raises ExportError naming the first output beyond tolerance."""
    errors = _errors(ref, ort_run(session, inputs), name)
    for i, (err, r) in enumerate(zip(errors, ref, strict=True)):
        scale = float(r.abs().max()) if r.numel() else 0.0
        if not err <= atol + rtol * scale:  # `not <=` so that a NaN error fails too
            raise ExportError(
                f"{name}: ONNX Runtime output {i} differs from PyTorch by {err:.3g} "
                f"(tolerance {atol:g} + {rtol:g} * max|ref| {scale:.3g})"
            )
    return max(errors, default=0.0)


def _errors(ref: list[torch.Tensor], got: list[np.ndarray], name: str) -> list[float]:
    """Max abs difference per output."""
    if len(ref) != len(got):
        raise ExportError(f"{name}: ONNX Runtime returned {len(got)} outputs, PyTorch {len(ref)}")
    per_output = []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        r_np = r.detach().cpu().numpy()
        if r_np.shape != g.shape:
            raise ExportError(f"{name}: output {i} has shape {g.shape} in ONNX Runtime, {r_np.shape} in PyTorch")
        diff = np.abs(r_np.astype(np.float64) - g.astype(np.float64))
        per_output.append(float(diff.max()) if diff.size else 0.0)
    return per_output


def _quantize_int8(
    fp32_path: Path,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    calib_data: Iterable[Any] | None,
    name: str,
    calibration: str = "percentile",
    fp32_modules: list[str] | None = None,
) -> list[str]:
    """Static QDQ INT8: per-channel QInt8 weights, QUInt8 activations (docs/notes/facts.md: signed activations left
    11 of 20 resnet18 convs unfused on AVX2 CPUs without VNNI; unsigned ran 0.54x fp32 time). The nodes of
    `fp32_modules` are left fp32; returns their names."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self, names: list[str], batches: Iterator[tuple[np.ndarray, ...]]) -> None:
            self._names, self._batches = names, batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else dict(zip(self._names, batch, strict=True))

    names = [i.name for i in ort_session(fp32_path).get_inputs()]
    batches = _calibration_batches(inputs if calib_data is None else calib_data, inputs, calib_data is None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "preprocessed.onnx"
            try:
                quant_pre_process(str(fp32_path), str(pre))
            except Exception:
                # ORT's symbolic shape inference asserts on Reshapes whose shape is computed in the graph
                # (e.g. GroupMaxPool's unflatten(1, (-1, 4)) of e2cnn models); ONNX's own inference suffices.
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            excluded = _nodes_of_modules(onnx.load(str(pre), load_external_data=False), fp32_modules or [], name)
            with quiet():  # the calibrator prints its progress on every call; FXSLIM_DEBUG=1 shows it
                quantize_static(
                    str(pre),
                    str(path),
                    _Reader(names, batches),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method={
                        "minmax": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy,
                    }[calibration],
                    nodes_to_exclude=excluded,
                )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"INT8 quantization of {name} failed: {_summary(exc)}") from exc
    return excluded


def _check_still_float(optimized: onnx.ModelProto, fp32_nodes: list[str], name: str) -> None:
    """ExportError when onnxruntime's graph optimizer fused a node kept fp32 into a quantized op anyway: it
    does so (quantizing the float weights itself) when the node's input already passes through a
    DequantizeLinear because another consumer of that tensor is quantized."""
    fused = sorted(
        {
            keep
            for n in optimized.graph.node
            if _QUANT_OPS.match(n.op_type)
            for keep in fp32_nodes
            if n.name == keep or n.name.startswith(f"{keep}_token")
        }
    )
    if fused:
        raise ExportError(
            f"fp32_modules: onnxruntime runs {fused} of {name} quantized anyway (their inputs are quantized "
            "for another consumer); fp32_modules keeps float only modules whose inputs are float, e.g. the "
            "first layer on the model input"
        )


def _nodes_of_modules(model: onnx.ModelProto, modules: list[str], name: str) -> list[str]:
    """Names of the ONNX nodes exported from each module in `modules`: the TorchScript exporter names them
    `/<qualified name>/<Op>`, the dynamo one lists the module scopes in the node's
    `pkg.torch.onnx.name_scopes` metadata. ExportError naming a module that no node comes from."""
    scopes = {
        n.name: ast.literal_eval(p.value)
        for n in model.graph.node
        for p in n.metadata_props
        if p.key == "pkg.torch.onnx.name_scopes"
    }
    out: list[str] = []
    for module in modules:
        hits = [
            n.name
            for n in model.graph.node
            if n.name.startswith(f"/{module}/") or any(s == module for s in scopes.get(n.name, ()))
        ]
        if not hits:
            raise ExportError(
                f"fp32_modules: no ONNX node of {name} comes from module {module!r} (node names start "
                f"like {[n.name for n in model.graph.node[:3]]})"
            )
        out += [h for h in hits if h not in out]
    return out


def _calibration_batches(data: Any, inputs: tuple[torch.Tensor, ...], single: bool) -> Iterator[tuple[np.ndarray, ...]]:
    """Model-input tuples from tensors or (x, y, ...) batches, cut along dim 0 to the exported batch size
    (the ONNX file has static shapes)."""
    items = [inputs] if single else data
    count = 0
    for item in items:
        if isinstance(item, torch.Tensor | np.ndarray):
            item = (item,)
        if not isinstance(item, tuple | list) or len(item) < len(inputs):
            raise ExportError(f"calib_data items must be tensors or (x, y) batches, got {type(item).__name__}")
        xs = [torch.as_tensor(x) for x in item[: len(inputs)]]
        if all(x.shape == e.shape for x, e in zip(xs, inputs, strict=True)):
            chunks: Iterable[tuple[torch.Tensor, ...]] = [tuple(xs)]
        elif all(x.ndim == e.ndim >= 1 and x.shape[1:] == e.shape[1:] for x, e in zip(xs, inputs, strict=True)):
            size, n = inputs[0].shape[0], xs[0].shape[0]
            chunks = [tuple(x[s : s + size] for x in xs) for s in range(0, n - size + 1, size)]
        else:
            raise ExportError(
                f"calib_data batch shapes {[tuple(x.shape) for x in xs]} do not match the example inputs "
                f"{[tuple(e.shape) for e in inputs]} (only the batch size may differ)"
            )
        for chunk in chunks:
            count += 1
            yield tuple(x.detach().cpu().numpy().astype(_to_numpy(e).dtype) for x, e in zip(chunk, inputs, strict=True))
    if count == 0:
        raise ExportError("calib_data gave no batch at least as large as the example inputs' batch")


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _perturbed(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A fixed-seed noisy copy of the float inputs (integer inputs such as token ids are kept as they are)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if x.is_floating_point() and x.numel():
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            x = x + 0.1 * (x.abs().mean() + 1e-3) * noise
        out.append(x)
    return tuple(out)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a nested tuple/list/dict output in the order the exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat_outputs(o)]
    return []  # None and Python scalars do not become ONNX outputs


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = _as_tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ExportError("example_inputs must be a tensor or a non-empty tuple of tensors")
    return inputs


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _summary(exc: BaseException, lines: int = 3) -> str:
    """The first informative lines of an exporter error (torch.export puts its cause under a summary
    heading after a page of generic advice)."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    kept = [ln.strip()[:300] for ln in text.splitlines() if ln.strip() and not ln.startswith("(Refer to")]
    kept = kept[:lines]
    prefix = "" if isinstance(exc, ExportError) else f"{type(exc).__name__}: "
    return prefix + " | ".join(kept)
