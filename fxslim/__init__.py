"""fxslim: a torch.fx graph-rewriting compiler that makes trained PyTorch models smaller and faster.

Public API (a contract, see docs): trace, analyze, count, compress, export_onnx, DependencyGraph and the
typed errors. Data flows one way: trace → annotate → analyze → rewrite passes → verify → export."""

# Adapters register their ops and tracing through the public `register_op`, as a user's code does.
from fxslim import e2cnn_adapter  # noqa: F401  (registers; imports e2cnn only when a model uses it)
from fxslim.api import CompressResult, compress
from fxslim.errors import AnalysisError, ExportError, FxslimError, PassError, RecipeError, TraceError
from fxslim.graph.cost import Cost, count
from fxslim.graph.deps import DependencyGraph, Group, analyze
from fxslim.ops import register_op
from fxslim.trace import trace


def export_onnx(module, example_inputs, path, *, quantize=None, calib_data=None, **kwargs):
    """Export to ONNX, check onnxruntime parity (fp32) or report INT8 drift; returns the max abs error."""
    from fxslim.export import export_onnx as _export

    return _export(module, example_inputs, path, quantize=quantize, calib_data=calib_data, **kwargs)


__all__ = [
    "AnalysisError", "CompressResult", "Cost", "DependencyGraph", "ExportError", "FxslimError", "Group",
    "PassError", "RecipeError", "TraceError", "analyze", "compress", "count", "export_onnx", "register_op", "trace",
]
