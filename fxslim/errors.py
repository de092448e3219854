"""Typed errors of fxslim: every failure a user can cause is one of these, with a message that names the
module, node or option at fault. Never raise a bare KeyError/ValueError from public entry points."""


class FxslimError(Exception):
    """Base class of every error fxslim raises on purpose. `pass_name` is the pass it happened in: set by the
    pass's option schema wrapper (fxslim/options.py) when the error leaves `run`, shown as the message's
    prefix, so a pass never writes its own name into a message."""

    def __init__(self, message: str = "", *, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pass_name = pass_name

    def __str__(self) -> str:
        return f"pass {self.pass_name!r}: {self.message}" if self.pass_name else self.message


class TraceError(FxslimError):
    """The model could not be turned into a torch.fx graph (names the module path and the construct)."""


class AnalysisError(FxslimError):
    """Shapes, costs or channel dependencies could not be computed (names the node)."""


class PassError(FxslimError):
    """A pass failed or produced a broken graph (names the pass and the node)."""


class RecipeError(FxslimError):
    """A recipe names an unknown pass or option, or gives an option a bad value (lists the valid ones)."""


class ExportError(FxslimError):
    """ONNX export failed or onnxruntime disagrees with PyTorch beyond the tolerance."""
