"""Pass `quantize`: INT8 inference for any traced model, by one of two backends.

backend="ort_static" is the deployment path: `fxslim.export`'s static QDQ INT8 (per-channel QInt8 weights,
QUInt8 activations: on AVX2 CPUs without VNNI signed activations leave convs unfused, docs/notes/facts.md),
calibrated on the first `calib_batches` batches of `ctx.data` (the example inputs when there is no
data). The fp32 export's onnxruntime parity is checked first; the record counts the ops ORT really runs
quantized (QLinearConv, QLinearMatMul, ...) and the returned GraphModule runs the INT8 file through an
`OrtModule` leaf, so it can be scored like any model. backend="torch_dynamic" is the equivariant-pruning
paper's method: `torch.ao.quantization.quantize_dynamic` of the Linear layers (weights INT8, activations
quantized on the fly). Both score the accuracy of the fp32 and the INT8 model on the last `eval_batches`
labelled batches of `ctx.data` when there are any, and raise a PassError when the drop exceeds `max_drop`.
The record carries {"int8": True}: the pass manager measures the symmetry error of an INT8 model but does
not enforce the fp32 tolerance on it. Quantize last: the INT8 module has no trainable weights. This pass
never mutates its input."""

from __future__ import annotations

import copy
import itertools
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from fxslim.errors import PassError
from fxslim.export import CALIBRATIONS, OrtModule, export_report
from fxslim.options import Option, Requires, Schema
from fxslim.pass_api import PassContext, PassResult
from fxslim.training import evaluate_accuracy, split_batch

NAME = "quantize"
BACKENDS = ("ort_static", "torch_dynamic")

OPTIONS = Schema(
    Option("backend", str, "ort_static (onnxruntime static QDQ INT8) or torch_dynamic (dynamic INT8 Linear)",
           choices=BACKENDS),
    Option("calib_batches", int, "batches of data that calibrate the activation ranges (ort_static)",
           range=">= 1", aliases=("calibration_batches",)),
    Option("calibration", str, "how the activation ranges are chosen (ort_static)", choices=CALIBRATIONS),
    Option("fp32_modules", list, "modules kept in fp32 inside the INT8 file (ort_static)", items=str,
           graph="modules"),
    Option("eval_batches", int, "last labelled batches scored in fp32 and INT8 (0: no accuracy check)", range=">= 0"),
    Option("max_drop", float, "fail when INT8 accuracy is lower than fp32 by more than this; None: report",
           range="[0, 1]", none=True),
    rules=[Requires(lambda o: not o["fp32_modules"] or o["backend"] == "ort_static",
                    lambda o: f"fp32_modules applies to backend='ort_static' only, not {o['backend']!r}")],
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    backend: str = "ort_static",
    calib_batches: int = 8,
    calibration: str = "percentile",
    fp32_modules: list[str] | tuple[str, ...] = (),
    eval_batches: int = 8,
    max_drop: float | None = None,
) -> PassResult:
    """backend: "ort_static" (onnxruntime static QDQ INT8) or "torch_dynamic" (PyTorch dynamic INT8 Linear).
    calib_batches: batches of ctx.data that calibrate the activation ranges (ort_static).
    calibration: how those ranges are chosen (ort_static): "percentile" (the default: clipped at the 99.999th
        percentile; it lost 0.77 / 0.50 points on the trained cnn1d / resnet56_1d where "minmax" lost
        1.07 / 0.93, tools/bench_equivariant.py), "minmax" (the observed range) or "entropy" (smallest KL
        divergence of the quantized histogram); see `fxslim.export.CALIBRATIONS`.
    fp32_modules: qualified names of modules kept in fp32 inside the INT8 file (ort_static), e.g. the
        first conv on raw pixels: on the fields-50% rotated-digits C4 net, keeping `features.0` fp32 cuts the
        INT8 loss from 9.2 points to 1.1 (tools/bench_equivariant.py).
    eval_batches: last labelled batches of ctx.data scored in fp32 and INT8 (0: no accuracy check).
    max_drop: PassError when the INT8 accuracy is lower than fp32 by more than this fraction; None: report.

    record: {"backend", "int8": True, "acc_fp32", "acc_int8", "drop" (None without labelled data), and
    for ort_static "quantized_ops", "fp32_nodes", "fp32_parity", "int8_drift", "onnx_bytes", "fp32_onnx_bytes"; for
    torch_dynamic "quantized_linear", "int8_drift"}."""
    fp32_modules = list(fp32_modules)
    if backend == "torch_dynamic":
        module, record = _torch_dynamic(gm, ctx)
    else:
        module, record = _ort_static(gm, ctx, calib_batches, calibration, fp32_modules)
    record.update(_accuracy(gm, module, ctx, eval_batches))
    if max_drop is not None and record["drop"] is not None and record["drop"] > max_drop:
        raise PassError(
            f"({backend}): INT8 accuracy {record['acc_int8']:.4f} is "
            f"{record['drop']:.4f} below fp32 {record['acc_fp32']:.4f} (max_drop {max_drop})"
        )
    ctx.debug("quantize: %s", record)
    return PassResult(module, True, record)


def _drift(a: nn.Module, b: nn.Module, inputs: tuple) -> float:
    with torch.no_grad():
        return float((a(*inputs) - b(*inputs)).abs().max())


def _torch_dynamic(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, dict]:
    new = copy.deepcopy(gm).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        torch.ao.quantization.quantize_dynamic(new, {nn.Linear}, dtype=torch.qint8, inplace=True)
    n = sum(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in new.modules())
    if n == 0:
        raise PassError(f"(torch_dynamic): {type(gm).__name__} has no nn.Linear to quantize")
    new.recompile()
    return new, {
        "backend": "torch_dynamic",
        "int8": True,
        "quantized_linear": n,
        "int8_drift": _drift(gm, new, ctx.example_inputs),
    }


def _ort_static(
    gm: fx.GraphModule, ctx: PassContext, calib_batches: int, calibration: str, fp32_modules: list[str]
) -> tuple[fx.GraphModule, dict]:
    calib = None if ctx.data is None else list(itertools.islice(ctx.data, calib_batches))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        report = export_report(
            gm,
            ctx.example_inputs,
            path,
            quantize="int8",
            calib_data=calib or None,
            calibration=calibration,
            fp32_modules=fp32_modules,
        )
        onnx_bytes, fp32_bytes = path.read_bytes(), report.fp32_path.stat().st_size
    root = nn.Module()
    root.int8 = OrtModule(onnx_bytes, int(ctx.example_inputs[0].shape[0]))
    graph = fx.Graph()
    xs = [graph.placeholder(n.name) for n in gm.graph.nodes if n.op == "placeholder"]
    graph.output(graph.call_module("int8", tuple(xs)))
    new = fx.GraphModule(root, graph, class_name=f"{type(gm).__name__}Int8")
    new.meta.update(gm.meta)
    return new.eval(), {
        "backend": "ort_static",
        "calibration": calibration,
        "int8": True,
        "quantized_ops": report.quantized_ops,
        "fp32_nodes": report.fp32_nodes,
        "fp32_parity": report.fp32_error,
        "int8_drift": report.max_abs_error,
        "onnx_bytes": len(onnx_bytes),
        "fp32_onnx_bytes": fp32_bytes,
    }


def _accuracy(fp32: nn.Module, int8: nn.Module, ctx: PassContext, eval_batches: int) -> dict:
    labelled = []
    if ctx.data is not None and eval_batches:
        labelled = [b for b in ctx.data if split_batch(b)[1] is not None][-eval_batches:]
    if not labelled:
        return {"acc_fp32": None, "acc_int8": None, "drop": None}
    acc_fp32 = evaluate_accuracy(copy.deepcopy(fp32), labelled)
    acc_int8 = evaluate_accuracy(int8, labelled)
    return {"acc_fp32": acc_fp32, "acc_int8": acc_int8, "drop": acc_fp32 - acc_int8}
