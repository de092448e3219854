"""Shape annotation: run the example inputs through a GraphModule and record each node's output metadata in
`node.meta['tensor_meta']` (torch.fx's own `ShapeProp` format, so every fx tool can read it). Conv and linear
layers get zero stand-ins instead of running where their values cannot matter (`stand_in`); a run that
meets a use where they could is repeated with every node running.
This file only annotates: it must never change the graph, the parameters, or leave the module in a
different train/eval state than it found it; a failure is an `AnalysisError` that names the node."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxslim.errors import AnalysisError
from fxslim.graph import stand_in


class _NodeFailure(Exception):
    """Internal: carries the failing node out of the interpreter so the message can name it."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node = node
        self.cause = cause


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """`torch.fx.passes.shape_prop._extract_tensor_metadata(t)`, equal field for field, without its Python
    re-derivation of contiguity: for a plain dense tensor the C++ flags `is_contiguous(memory_format=...)`
    hold the same answers (tested in tests/graph/test_shape.py); anything else goes through torch's own."""
    if type(t) not in _PLAIN_TENSORS or t.layout is not torch.strided or t.is_quantized or not t.numel():
        return _extract_tensor_metadata(t)
    fmt = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _record(node: fx.Node, value: Any) -> None:
    """What `ShapeProp.run_node` stores: `meta['tensor_meta']` when the value holds a tensor, `meta['type']`."""
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = tensor_metadata(value)
    elif isinstance(value, (tuple, list, dict, slice)):
        found = []

        def extract(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(value, extract)
        if found:
            node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)


def _last_uses(nodes: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values that no node after it reads (freed as the run goes, as fx.Interpreter does)."""
    seen: set[fx.Node] = set()
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(nodes):
        for a in node.all_input_nodes:
            if a not in seen:
                seen.add(a)
                out.setdefault(node, []).append(a)
    return out


def _run_recording(gm: fx.GraphModule, inputs: tuple, modules: dict, flow: stand_in.Flow | None) -> None:
    """Run `gm`'s graph node by node, as `torch.fx.Interpreter.run` does (same placeholder, attribute, call and
    output semantics), recording each node's metadata as `ShapeProp` does. fx's Interpreter spends most of
    its time per node outside the ops (a context manager, getattr dispatch, an attribute walk per module
    call, a Python contiguity check per tensor); this loop keeps only the calls. With a `flow`, conv and
    linear layers get stand-ins where `stand_in.output_of` gives one (None: every node runs)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    frees = _last_uses(nodes)
    args_iter = iter(graph.process_inputs(*inputs))
    env: dict[fx.Node, Any] = {}
    load = env.__getitem__
    for node in nodes:
        if flow is not None and flow.started():
            flow.check(node)  # stand_in.ValuesMatter: run again without stand-ins
        try:
            value = _run_node(gm, node, modules, env, load, args_iter, flow)
        except Exception as e:  # any user-code failure becomes an AnalysisError naming the node
            raise _NodeFailure(node, e) from e
        _record(node, value)
        env[node] = value
        for dead in frees.get(node, ()):
            del env[dead]
        if node.op == "output":
            return


def _run_node(
    gm: fx.GraphModule, node: fx.Node, modules: dict, env: dict, load, args_iter, flow: stand_in.Flow | None
) -> Any:
    op = node.op
    if op == "placeholder":
        if str(node.target).startswith("*"):
            return list(args_iter)
        try:
            return next(args_iter)
        except StopIteration as si:
            if node.args:
                return node.args[0]
            raise RuntimeError(f"no value passed for input {node.target!r} and it has no default") from si
    args = fx.node.map_arg(node.args, load)
    kwargs = fx.node.map_arg(node.kwargs, load)
    if op == "call_function":
        return node.target(*args, **kwargs)
    if op == "call_module":
        module = modules.get(node.target)
        if module is None:
            module = _fetch(gm, node.target)
        if flow is not None and type(module) in stand_in.LAYERS:
            value = stand_in.output_of(module, args, kwargs)
            if value is not None:
                flow.add(node)
                return value
        return module(*args, **kwargs)
    if op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if op == "get_attr":
        return _fetch(gm, node.target)
    if op == "output":
        return args[0]
    raise RuntimeError(f"node {node.name!r} has unknown op {op!r}")


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    """`Interpreter.fetch_attr`: walk the qualified name, naming the missing part."""
    value: Any = gm
    for i, part in enumerate(target.split(".")):
        if not hasattr(value, part):
            raise RuntimeError(f"Node referenced nonexistent target {'.'.join(target.split('.')[: i + 1])}")
        value = getattr(value, part)
    return value


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
    config, tensors = [], []
    for name, m in gm.named_modules():  # one walk (state_dict() would walk the tree again, with its hooks)
        config.append((name, type(m).__name__, m.extra_repr()))
        for store in (m._parameters, m._buffers):
            tensors += [(name, k, v.shape, v.dtype) for k, v in store.items() if v is not None]
    inputs = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs)
    return gm.code, tuple(tensors), tuple(config), inputs


def propagate(gm: fx.GraphModule, example_inputs: tuple, *, reuse: bool = False, stand_ins: bool = True) -> None:
    """Annotate every node of `gm` with `meta['tensor_meta']` by running `example_inputs` through it.

    reuse=True skips the run when the shapes on the nodes were propagated for this very module state and
    inputs (same `fingerprint`): a pass manager annotating costs right after a rewrite verified its shapes
    would otherwise run the model once more.

    Runs in eval mode under `torch.no_grad()` (costs and shapes of the deployed model, no autograd
    memory), then restores each submodule's own `training` flag. Stale `tensor_meta` (copied along with
    nodes by passes) is cleared first so a node never keeps a shape it no longer has. A single tensor is
    accepted in place of a 1-tuple. Raises `AnalysisError` naming the failing node and the input shapes.

    stand_ins=True records a zero tensor of the computed shape for conv and linear layers instead of running
    them, under `stand_in`'s conditions (allowlisted ops only, stand-in values used as data only); a run
    whose stand-in values reach any other use, or that fails, is repeated with every node running, so the
    metadata and errors are the plain run's. stand_ins=False runs every node."""
    inputs = _as_tuple(example_inputs)
    stamp = (fingerprint(gm, inputs), stand_ins)
    fresh = all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder")
    if reuse and fresh and gm.meta.get(SHAPES_META) == stamp:
        return
    gm.meta.pop(SHAPES_META, None)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    training = [m for m in gm.modules() if m.training]  # usually just the GraphModule root
    for module in training:  # what gm.eval() does, without a second walk of the module tree
        module.training = False
    modules = dict(gm.named_modules(remove_duplicate=False))
    try:
        with torch.no_grad():
            if stand_ins and stand_in.graph_allows(gm, modules):
                try:
                    _run_recording(gm, inputs, modules, stand_in.Flow())
                except (stand_in.ValuesMatter, _NodeFailure):  # every node runs: torch's own error, if any
                    for node in gm.graph.nodes:
                        node.meta.pop("tensor_meta", None)
                        node.meta.pop("type", None)
                    _run_recording(gm, inputs, modules, None)
            else:
                _run_recording(gm, inputs, modules, None)
    except _NodeFailure as f:
        n = f.node
        raise AnalysisError(
            f"shape propagation failed at node {n.name!r} (op={n.op}, target={describe_target(gm, n)}): "
            f"{type(f.cause).__name__}: {f.cause}; example inputs: {_describe_inputs(gm, inputs)}"
        ) from f.cause
    finally:
        for module in training:
            module.training = True
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


def out_shape(node: fx.Node | object) -> tuple[int, ...] | None:
    """Output shape of a node whose value is one tensor; None for non-tensors, tuples of tensors, nodes
    that were not propagated, and arguments that are not nodes (constants)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    # TensorMetadata is itself a NamedTuple, so test for it before treating `meta` as a container.
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None
