"""ONNX export: parity with PyTorch, exporter fallback, typed errors, INT8 calibration and op counting."""

import functools
import math
import time

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxslim.export as export
from fxslim.errors import ExportError
from fxslim.export import export_onnx, export_report, ort_run, ort_session, quantized_op_counts


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


class TupleNet(nn.Module):
    """Nested tuple/list/dict outputs, plus a None that exporters drop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        return y.relu(), {"pooled": y.mean((2, 3)), "rest": [y.amax((2, 3)), None]}


class NumpyTanh(nn.Module):
    """Calls a Python function on numpy arrays: a TorchScript trace bakes it into a constant (caught by the
    perturbed-input check) and torch.export refuses `.numpy()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_numpy(np.vectorize(math.tanh)(x.numpy()).astype(np.float32))


def _small_net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


@pytest.mark.parametrize("traced", [False, True], ids=["module", "graphmodule"])
def test_small_net_matches_pytorch_and_module_is_untouched(tmp_path, traced):
    model = _small_net()
    if traced:
        model = torch.fx.symbolic_trace(model)
    model.train()
    model.bn1.eval()  # mixed flags must come back exactly as they were
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)

    err = export_onnx(model, x, tmp_path / "net.onnx")

    assert (tmp_path / "net.onnx").stat().st_size > 0
    assert 0 <= err < 1e-4
    assert model.training and not model.bn1.training and model.conv1.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # The returned error is what ORT really gives on the file.
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = ort_run(ort_session(tmp_path / "net.onnx"), (x,))[0]
    assert np.abs(got - ref).max() == pytest.approx(err, abs=1e-9)


def test_tuple_and_dict_outputs_are_flattened_and_compared(tmp_path):
    torch.manual_seed(0)
    report = export_report(TupleNet(), (torch.randn(1, 3, 8, 8),), tmp_path / "tuple.onnx")
    assert report.exporter == "torchscript" and report.failed_attempts == []
    assert 0 <= report.max_abs_error < 1e-5
    outputs = ort_run(ort_session(tmp_path / "tuple.onnx"), torch.randn(1, 3, 8, 8))
    assert [o.shape for o in outputs] == [(1, 4, 6, 6), (1, 4), (1, 4)]


def test_unexportable_model_raises_export_error_naming_the_model(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(NumpyTanh(), torch.randn(1, 3, 4, 4), tmp_path / "np.onnx")
    message = str(info.value)
    assert "NumpyTanh" in message
    assert "torchscript exporter" in message and "on perturbed inputs" in message
    assert "dynamo exporter" in message and ".numpy()" in message


def test_parity_failure_raises_export_error_naming_the_output(tmp_path, monkeypatch):
    def shifted(session, inputs):
        return [o + 0.5 for o in ort_run(session, inputs)]

    monkeypatch.setattr(export, "ort_run", shifted)
    monkeypatch.setattr(export, "EXPORTER_ORDER", ("torchscript",))
    with pytest.raises(ExportError, match=r"SmallNet.*output 0 differs from PyTorch by 0\.5"):
        export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")


def test_falls_back_to_dynamo_when_torchscript_raises(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("tracer exploded\nsecond line\nthird line\nfourth line")

    monkeypatch.setitem(export._EXPORTERS, "torchscript", broken)
    report = export_report(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    assert report.exporter == "dynamo"
    assert report.failed_attempts == ["torchscript exporter: RuntimeError: tracer exploded | second line | third line"]
    assert report.max_abs_error < 1e-4
    assert not (tmp_path / "net.onnx.data").exists()  # weights stay inside the one file


def test_unknown_quantize_mode_lists_valid_values(tmp_path):
    with pytest.raises(ExportError, match=r"'int4'.*None, 'int8'"):
        export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx", quantize="int4")


def test_int8_is_calibrated_reports_drift_and_really_runs_quantized_ops(tmp_path):
    model, x = _small_net(), torch.randn(1, 3, 16, 16)
    # (x, y) batches of 8 are cut to the exported batch size of 1.
    calib = [(torch.randn(8, 3, 16, 16), torch.zeros(8)) for _ in range(4)]

    report = export_report(model, x, tmp_path / "net.int8.onnx", quantize="int8", calib_data=calib)

    assert (tmp_path / "net.int8.onnx").exists() and (tmp_path / "net.int8.fp32.onnx").exists()
    assert report.fp32_error < 1e-4
    with torch.no_grad():
        scale = float(model.eval()(x).abs().max())
    # Quantization changes the numbers (drift > 0), but by a few percent of the output scale at most.
    assert np.isfinite(report.max_abs_error) and 0 < report.max_abs_error < 0.1 * scale
    counts = quantized_op_counts(tmp_path / "net.int8.onnx")
    assert counts == report.quantized_ops
    assert counts.get("QLinearConv", 0) == 2 and counts.get("QLinearAdd", 0) == 1
    # The file itself is QDQ; the fused QLinearConv only exists in the graph ORT runs.
    assert "QLinearConv" not in export.op_counts(tmp_path / "net.int8.onnx", optimized=False)


def test_fp32_modules_keep_a_first_layer_float_in_the_int8_file(tmp_path):
    model, x = _small_net(), torch.randn(1, 3, 16, 16)
    report = export_report(model, x, tmp_path / "q.onnx", quantize="int8", fp32_modules=["conv1"])
    assert report.fp32_nodes == ["/conv1/Conv"]  # BatchNorm folded into it
    assert report.quantized_ops.get("QLinearConv", 0) == 1  # conv2 only
    assert export.op_counts(tmp_path / "q.onnx").get("Conv", 0) == 1  # conv1 runs as a float Conv
    with pytest.raises(ExportError, match=r"no ONNX node of SmallNet comes from module 'conv9'"):
        export_report(model, x, tmp_path / "r.onnx", quantize="int8", fp32_modules=["conv9"])
    with pytest.raises(ExportError, match="only applies with quantize='int8'"):
        export_report(model, x, tmp_path / "s.onnx", fp32_modules=["conv1"])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_fp32_module_whose_input_is_quantized_is_an_error_not_a_silent_int8_op(tmp_path, monkeypatch, exporter):
    monkeypatch.setattr(export, "EXPORTER_ORDER", (exporter,))
    # conv2's input also feeds the quantized Add: onnxruntime would fuse conv2 into a QLinearConv anyway.
    with pytest.raises(ExportError, match=r"runs \[.*\] of SmallNet quantized anyway"):
        export_report(
            _small_net(), torch.randn(1, 3, 16, 16), tmp_path / "q.onnx", quantize="int8", fp32_modules=["conv2"]
        )


def test_int8_without_calib_data_uses_example_inputs(tmp_path):
    drift = export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "q.onnx", quantize="int8")
    assert np.isfinite(drift) and drift > 0
    assert quantized_op_counts(tmp_path / "q.onnx").get("QLinearConv", 0) > 0


@pytest.mark.parametrize("debug", ["", "1"], ids=["quiet", "FXSLIM_DEBUG"])
def test_int8_export_keeps_the_calibrators_chatter_out_of_stdout_unless_debugging(tmp_path, capfd, monkeypatch, debug):
    monkeypatch.setenv("FXSLIM_DEBUG", debug)
    calib = [torch.randn(1, 3, 8, 8) for _ in range(2)]
    export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "q.onnx", quantize="int8", calib_data=calib)
    out, err = capfd.readouterr()
    if debug:  # onnxruntime's calibrator prints its progress with Python's print on every call
        assert "Collecting tensor data and making histogram" in out
    else:
        assert out == ""
        assert "histogram" not in err


def test_calibration_batch_of_wrong_shape_raises(tmp_path):
    with pytest.raises(ExportError, match="calib_data batch shapes"):
        export_onnx(
            _small_net(),
            torch.randn(1, 3, 8, 8),
            tmp_path / "q.onnx",
            quantize="int8",
            calib_data=[torch.randn(4, 3, 9, 9)],
        )


def test_ort_run_rejects_wrong_number_of_inputs(tmp_path):
    export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    with pytest.raises(ExportError, match="takes 1 inputs"):
        ort_run(ort_session(tmp_path / "net.onnx"), (torch.randn(1, 3, 8, 8), torch.randn(1)))


# Unpruned parity on two torchvision models, plain and traced; tests/test_torchvision_prune.py checks parity
# of six pruned torchvision models (densenet, shufflenet, efficientnet, vit included) on the same exporter.
TORCHVISION = {
    "resnet18": (lambda: torchvision.models.resnet18(), 64),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 64),
}


@functools.lru_cache(maxsize=1)
def _torchvision_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Random-init model with outputs of order one, so that parity is not checked on ~1e-10 numbers:
    BatchNorm statistics are set from one random batch and ViT's zero-initialised head gets weights."""
    factory, size = TORCHVISION[name]
    torch.manual_seed(0)
    model = factory()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(4, 3, size, size))
        if name == "vit_b_16":
            nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval(), torch.randn(1, 3, size, size)


@pytest.mark.parametrize("traced", [False, True], ids=["module", "graphmodule"])
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_parity(tmp_path, name, traced):
    model, x = _torchvision_model(name)
    if traced:
        model = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 0.05  # the comparison below is not vacuous

    start = time.perf_counter()
    report = export_report(model, x, tmp_path / f"{name}.onnx")
    print(
        f"{name} {'graphmodule' if traced else 'module'}: {report.exporter} "
        f"{time.perf_counter() - start:.2f} s, error {report.max_abs_error:.2e}, max|ref| {scale:.2f}"
    )

    assert report.exporter == "torchscript"
    assert report.max_abs_error < 1e-4 * max(1.0, scale)


def test_ort_latency_returns_a_median_per_file(tmp_path):
    from fxslim.export import ort_latency

    x = torch.randn(1, 3, 8, 8)
    export_onnx(_small_net(), x, tmp_path / "a.onnx")
    export_onnx(_small_net(), x, tmp_path / "b.onnx")
    t = ort_latency({"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"}, x, budget_s=0.2)
    assert sorted(t) == ["a", "b"] and all(0 < v < 1 for v in t.values())


def test_ort_profile_splits_a_run_into_kernels_and_overhead(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    export_onnx(SmallNet().eval(), (x,), tmp_path / "m.onnx")
    prof = export.ort_profile(tmp_path / "m.onnx", (x,), runs=20)
    assert prof["nodes"] >= 3  # convs (fused with their activations), the add/mean and the Gemm
    assert any("Conv" in op for op in prof["ops_us"])
    assert all(us > 0 for us in prof["ops_us"].values())
    assert prof["kernel_us"] == pytest.approx(sum(prof["ops_us"].values()))
    assert 0 < prof["kernel_us"] <= prof["run_us"]
    assert prof["overhead_us"] == pytest.approx(prof["run_us"] - prof["kernel_us"])


def test_unknown_calibration_lists_valid_values(tmp_path):
    with pytest.raises(ExportError, match=r"'kl'.*minmax, percentile, entropy"):
        export_onnx(_small_net(), torch.randn(1, 3, 8, 8), tmp_path / "q.onnx", quantize="int8", calibration="kl")


def _input_scale(path) -> float:
    """The scale of the QuantizeLinear that quantizes the graph input in a QDQ file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    first = model.graph.input[0].name
    (node,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == first]
    return float(inits[node.input[1]])


def test_percentile_calibration_ignores_a_rare_outlier_that_minmax_follows(tmp_path):
    model, x = _small_net(), torch.randn(1, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(128)]  # 1,024 samples of 192 values each
    calib[0][0, 0, 0, 0] = 1000.0  # one value in ~200,000: far beyond the 99.999th percentile
    drift, scale = {}, {}
    for method in ("minmax", "percentile"):
        path = tmp_path / f"{method}.onnx"
        drift[method] = export_onnx(model, x, path, quantize="int8", calib_data=calib, calibration=method)
        scale[method] = _input_scale(path)
    # minmax spends the input's 256 uint8 levels on [-4.x, 1000] (a step of ~3.9); percentile clips the
    # outlier: the range of 200,000 N(0, 1) draws, about [-4.5, 4.5], a step near 0.035.
    assert 3.8 < scale["minmax"] < 4.1
    assert 0.02 < scale["percentile"] < 0.05
    assert drift["percentile"] < drift["minmax"]
