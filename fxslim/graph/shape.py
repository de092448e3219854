"""Shape annotation: run the example inputs through a GraphModule once and record each node's output
metadata in `node.meta['tensor_meta']` (torch.fx's own `ShapeProp` format, so every fx tool can read it).
This file only annotates: it must never change the graph, the parameters, or leave the module in a
different train/eval state than it found it; a failure is an `AnalysisError` that names the node."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from fxslim.errors import AnalysisError


class _NodeFailure(Exception):
    """Internal: carries the failing node out of the interpreter so the message can name it."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node = node
        self.cause = cause


class _QuietShapeProp(ShapeProp):
    """`ShapeProp` that reports the failing node to us instead of printing a traceback to stderr.

    The stock `run_node` calls `traceback.print_exc()` and re-raises a RuntimeError that embeds the whole
    `node.meta`; we want one typed error with a short message, so we run the node ourselves and record
    the metadata exactly as `ShapeProp` does (same `TensorMetadata`, same `meta['type']`)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as e:  # any user-code failure becomes an AnalysisError naming the node
            raise _NodeFailure(n, e) from e
        found_tensor = False

        def extract(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, extract)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{format_shape(tuple(value.shape))} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _describe_inputs(gm: fx.GraphModule, example_inputs: tuple) -> str:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    parts = [f"{name}={_describe_value(v)}" for name, v in zip(names, example_inputs, strict=False)]
    if len(example_inputs) != len(names):
        parts.append(f"({len(example_inputs)} inputs given for {len(names)} placeholders)")
    return ", ".join(parts) if parts else "(none)"


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def format_shape(shape: tuple[int, ...]) -> str:
    """`(1, 3, 16, 16)` -> `1x3x16x16`; a 0-d tensor is `()`. Shared with the IR dumps."""
    return "x".join(str(d) for d in shape) if shape else "()"


SHAPES_META = "fxslim_shapes_of"  # gm.meta key: the fingerprint the node shapes were propagated for


def fingerprint(gm: fx.GraphModule, example_inputs: tuple) -> tuple:
    """What node shapes depend on: the generated code (graph structure and arguments), every parameter and
    buffer shape and dtype, every module's configuration (stride, groups, ...) and the input shapes."""
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in gm.state_dict(keep_vars=True).items())
    config = tuple((name, type(m).__name__, m.extra_repr()) for name, m in gm.named_modules())
    inputs = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs)
    return gm.code, tensors, config, inputs


def propagate(gm: fx.GraphModule, example_inputs: tuple, *, reuse: bool = False) -> None:
    """Annotate every node of `gm` with `meta['tensor_meta']` by running `example_inputs` through it.

    reuse=True skips the run when the shapes on the nodes were propagated for this very module state and
    inputs (same `fingerprint`): a pass manager annotating costs right after a rewrite verified its shapes
    would otherwise run the model once more.

    Runs in eval mode under `torch.no_grad()` (costs and shapes of the deployed model, no autograd
    memory), then restores each submodule's own `training` flag. Stale `tensor_meta` (copied along with
    nodes by passes) is cleared first so a node never keeps a shape it no longer has. A single tensor is
    accepted in place of a 1-tuple. Raises `AnalysisError` naming the failing node and the input shapes."""
    inputs = _as_tuple(example_inputs)
    stamp = fingerprint(gm, inputs)
    fresh = all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder")
    if reuse and fresh and gm.meta.get(SHAPES_META) == stamp:
        return
    gm.meta.pop(SHAPES_META, None)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    training = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _QuietShapeProp(gm).propagate(*inputs)
    except _NodeFailure as f:
        n = f.node
        raise AnalysisError(
            f"shape propagation failed at node {n.name!r} (op={n.op}, target={describe_target(gm, n)}): "
            f"{type(f.cause).__name__}: {f.cause}; example inputs: {_describe_inputs(gm, inputs)}"
        ) from f.cause
    finally:
        for module, flag in training.items():
            module.training = flag
    gm.meta[SHAPES_META] = stamp


# Where a function lives -> how a reader writes it; anything else keeps the last part of its module.
_MODULE_ALIASES = {
    "torch.nn.functional": "F",
    "torch._C._nn": "F",
    "torch._C._VariableFunctions": "torch",
    "torch._C._linalg": "torch.linalg",
    "_operator": "operator",
    "builtins": "",
}


def describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short readable target: `layer1.0.conv1 (Conv2d)`, `F.relu`, `operator.add`, `Tensor.view`."""
    if node.op == "call_module":
        try:
            kind = type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            kind = "?"
        return f"{node.target} ({kind})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", None) or repr(fn)
        module = getattr(fn, "__module__", None) or ""
        prefix = _MODULE_ALIASES.get(module, module.rsplit(".", 1)[-1])
        return f"{prefix}.{name}" if prefix else name
    return str(node.target)


def out_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Output shape of a node whose value is one tensor; None for non-tensors, tuples of tensors, or
    nodes that were not propagated."""
    meta = node.meta.get("tensor_meta")
    # TensorMetadata is itself a NamedTuple, so test for it before treating `meta` as a container.
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None
