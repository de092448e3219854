"""Trace: turn an nn.Module into a torch.fx GraphModule, the IR every later stage reads.

Uses `torch.fx.Tracer` with a leaf policy: torch.nn modules (fx's default), the user's `leaf_modules`
(types or qualified names) and fxslim's own leaf types (`_REGISTERED_LEAVES`). The module tree is
cloned first (graph/clone.py: new module objects, shared tensors, so no flag or attribute of the caller's
model is ever touched) and traced in eval mode so `self.training` branches take their inference path.
Failures become `TraceError`s that name the module path being traced and the Python construct that
broke tracing. e2cnn models are traced through the e2cnn adapter (fxslim/e2cnn_adapter.py): their e2cnn
modules become plain-torch exports, the GeometricTensor wrap/unwrap traces as identity, and the declared
group and field layout land in `gm.meta`. This file must never change the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from torch import fx, nn

from fxslim import e2cnn_adapter
from fxslim.errors import TraceError
from fxslim.graph.clone import clone_gm, shallow_clone
from fxslim.modules import SlimMultiheadAttention

# Module types fxslim inserts or exports, each with its own channel rule; fx never looks inside them.
_REGISTERED_LEAVES: set[type] = {SlimMultiheadAttention, e2cnn_adapter.GroupMaxPool}


def register_leaf(module_type: type) -> None:
    """Declare a module type that fx must not trace into (it needs a channel rule in graph/rules/)."""
    _REGISTERED_LEAVES.add(module_type)


class _Tracer(fx.Tracer):
    # Defaults: torch.load rebuilds a saved GraphModule's tracer class with no arguments.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.path: list[str] = []
        self.failed_at: list[str] | None = None
        # e2cnn models: module id -> output field type of the e2cnn module it was exported from
        self.geometric: dict[int, object] | None = None
        self._param_index: tuple[nn.Module, dict[int, str]] | None = None  # (root, id(parameter) -> name)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's behaviour for a parameter read as a module attribute (a get_attr node named by its first
        qualified name, one per name), found in a dict instead of fx's scan of `root.named_parameters()` on
        every read: quadratic on models that read many (ConvNeXt's layer scales, ViT's embeddings)."""
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            if self._param_index is None or self._param_index[0] is not self.root:
                self._param_index = (self.root, {id(p): n for n, p in self.root.named_parameters()})
            name = self._param_index[1].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        # Keep the module path so a failure deep inside can say where it happened.
        self.path.append(self.path_of_module(m) or type(m).__name__)
        try:
            if self.geometric is None:
                return super().call_module(m, forward, args, kwargs)
            args, kwargs = e2cnn_adapter.unwrap_args(args, kwargs)
            out = super().call_module(m, forward, args, kwargs)
            return e2cnn_adapter.wrap_output(out, self.geometric.get(id(m)))
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.path)
            raise
        finally:
            self.path.pop()


def _construct(exc: BaseException) -> str:
    msg = str(exc)
    if "cannot be iterated" in msg or "len(" in msg:
        return "iteration over a traced value (len(), a for loop or *args over a tensor or its shape)"
    if "control flow" in msg or "bool" in msg:
        return "data-dependent control flow (an `if`/`while`/`assert` on a tensor value)"
    if "numpy" in msg.lower() or "__array__" in msg:
        return "a numpy call on a traced tensor"
    return "Python that torch.fx cannot trace symbolically"


def trace(
    model: nn.Module, example_inputs: tuple | None = None, *, leaf_modules: Iterable[type | str] = ()
) -> fx.GraphModule:
    """Return a NEW GraphModule for `model` (the model is left untouched).

    Like `torch.fx.symbolic_trace`, the result shares parameter tensors with `model` until a pass rewrites
    them; `fxslim.compress` returns modules that share nothing. `leaf_modules` lists module types or
    qualified names (e.g. "features.3") that are kept as single nodes. `example_inputs` is accepted for
    symmetry with the other entry points; tracing is symbolic."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return clone_gm(model)
    leaves = tuple(m for m in leaf_modules if isinstance(m, type)) + tuple(_REGISTERED_LEAVES)
    names = frozenset(m for m in leaf_modules if isinstance(m, str))
    unknown = sorted(n for n in names if n not in dict(model.named_modules()))
    if unknown:
        raise TraceError(f"leaf_modules names not found in {type(model).__name__}: {unknown}")
    root = shallow_clone(model)
    tracer = _Tracer(leaves, names)
    meta = dict(getattr(model, "fxslim_meta", {}) or {})
    geometric = contextlib.nullcontext()
    if e2cnn_adapter.is_e2cnn_model(model):
        meta.update(e2cnn_adapter.model_meta(model))
        root, tracer.geometric = e2cnn_adapter.plain_root(root)
        geometric = e2cnn_adapter.geometric_tracing()
    root.eval()
    try:
        with geometric:
            graph = tracer.trace(root)
    except Exception as exc:
        where = (tracer.failed_at or [""])[-1] or "<top level forward>"
        raise TraceError(
            f"cannot trace {type(model).__name__}: {_construct(exc)} in module {where!r}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Make that module a leaf (leaf_modules=[...]) or remove the construct."
        ) from exc
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.meta.update(meta)
    return gm
