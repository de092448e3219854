"""Trace: turn an nn.Module into a torch.fx GraphModule, the IR every later stage reads.

Uses `torch.fx.Tracer` with a leaf policy: torch.nn modules (fx's default), the user's `leaf_modules`
(types or qualified names) and the types `fxslim.register_op(..., leaf=True)` declared. The module tree is
cloned first (graph/clone.py: new module objects, shared tensors, so no flag or attribute of the caller's
model is ever touched) and traced in eval mode so `self.training` branches take their inference path.
Failures become `TraceError`s that name the module path being traced and the Python construct that
broke tracing. A model family fx cannot trace as written registers a `TraceAdapter`
(`register_trace_adapter`): it claims the model, swaps what fx cannot read for traceable stand-ins, turns
its wrapper values into plain tensors around each module call, and gives the metadata that lands in
`gm.meta` (the e2cnn adapter does this for e2cnn models). This file names no adapter and must never change
the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from torch import fx, nn

from fxslim.errors import TraceError
from fxslim.graph.clone import clone_gm, shallow_clone
from fxslim.ops import LEAF_TYPES


class TraceAdapter(Protocol):
    """A model family torch.fx cannot trace as written (e.g. modules that pass wrapper objects around)."""

    def claims(self, model: nn.Module) -> bool:
        """Whether this adapter traces `model`."""

    def meta(self, model: nn.Module) -> dict:
        """What the stand-ins lose, kept in `gm.meta` (e.g. a symmetry group and a channel layout)."""

    def prepare(self, root: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
        """Swap, in `root` (a copy), what fx cannot read for traceable stand-ins; per stand-in module id, what
        `wrap` needs to rebuild its output's wrapper."""

    def tracing(self) -> contextlib.AbstractContextManager:
        """A context in force while fx traces (e.g. letting a wrapper hold a Proxy)."""

    def unwrap(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Wrapper arguments of a module call become plain tensors."""

    def wrap(self, out: Any, info: Any) -> Any:
        """A stand-in's output wrapped back as the original module's (`info` from `prepare`)."""


_ADAPTERS: list[TraceAdapter] = []


def register_trace_adapter(adapter: TraceAdapter) -> None:
    """Make `trace` hand the models `adapter` claims to it (the first claiming adapter wins)."""
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)


class _Tracer(fx.Tracer):
    # Defaults: torch.load rebuilds a saved GraphModule's tracer class with no arguments.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.path: list[str] = []
        self.failed_at: list[str] | None = None
        self.adapter: TraceAdapter | None = None  # the adapter of the model being traced, if any
        self.wrap_info: dict[int, Any] = {}  # stand-in module id -> the adapter's info to re-wrap its output
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
            if self.adapter is None:
                return super().call_module(m, forward, args, kwargs)
            args, kwargs = self.adapter.unwrap(args, kwargs)
            out = super().call_module(m, forward, args, kwargs)
            return self.adapter.wrap(out, self.wrap_info.get(id(m)))
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
    leaves = tuple(m for m in leaf_modules if isinstance(m, type)) + tuple(LEAF_TYPES)
    names = frozenset(m for m in leaf_modules if isinstance(m, str))
    unknown = sorted(n for n in names if n not in dict(model.named_modules()))
    if unknown:
        raise TraceError(f"leaf_modules names not found in {type(model).__name__}: {unknown}")
    root = shallow_clone(model)
    tracer = _Tracer(leaves, names)
    meta = dict(getattr(model, "fxslim_meta", {}) or {})
    tracer.adapter = next((a for a in _ADAPTERS if a.claims(model)), None)
    tracing: contextlib.AbstractContextManager = contextlib.nullcontext()
    if tracer.adapter is not None:
        meta.update(tracer.adapter.meta(model))
        root, tracer.wrap_info = tracer.adapter.prepare(root)
        tracing = tracer.adapter.tracing()
    root.eval()
    try:
        with tracing:
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
