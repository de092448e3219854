"""Pass `fold_bn`: fold each inference-mode BatchNorm1d/2d/3d into the Conv1d/2d/3d or Linear that feeds it,
so the pair becomes one layer computing the same function with the BN's running statistics. It only folds
where that is exact for every use of the layer (the conv's output feeds only the BN, the conv module has one
call site, its weights are read nowhere else); it never mutates the GraphModule it is given and never folds
with batch statistics (a model in train mode computes something else, by design of BatchNorm)."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxslim.graph.shape import out_shape
from fxslim.module_state import device_of, eval_mode
from fxslim.options import Schema
from fxslim.pass_api import PassContext, PassResult

NAME = "fold_bn"

# Which BatchNorm may follow which layer: the BN's channel dim (dim 1) must be the layer's output channels.
_FOLDABLE: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


OPTIONS = Schema()


@OPTIONS.checks
def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fold every foldable (conv | linear) -> BatchNorm pair of a copy of `gm`; list the others as skipped.

    The pass has no options. record: {"folded": [[layer, bn], ...], "skipped": [[bn, reason], ...]}.
    """
    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    call_sites = _count_call_sites(gm)
    attr_reads = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    ranks: dict[str, int] | None = None  # computed lazily: only Linear -> BN1d needs the output rank

    folded: list[list[str]] = []
    skipped: list[list[str]] = []
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not isinstance(modules[bn_node.target], _BATCHNORMS):
            continue
        layer_node = bn_node.args[0] if bn_node.args else None
        reason = _why_not_foldable(bn_node, layer_node, modules, call_sites, attr_reads)
        if reason is None and isinstance(modules[layer_node.target], nn.Linear):
            if ranks is None:
                ranks = _output_ranks(gm, ctx)
            if ranks.get(layer_node.name) != 2:
                # BN1d normalises dim 1; a Linear's channels are its last dim: the same dim only in 2-D.
                reason = f"linear output has rank {ranks.get(layer_node.name, 'unknown')}, not 2"
        if reason is not None:
            skipped.append([str(bn_node.target), reason])
            ctx.debug("fold_bn: skip %s (%s)", bn_node.target, reason)
            continue
        fold_into(modules[layer_node.target], modules[bn_node.target])
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        folded.append([str(layer_node.target), str(bn_node.target)])
        ctx.debug("fold_bn: folded %s into %s", bn_node.target, layer_node.target)

    _delete_unreferenced(gm, {bn for _, bn in folded})
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, changed=bool(folded), record={"folded": folded, "skipped": skipped})


def fold_into(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, bn: nn.BatchNorm1d) -> None:
    """Rewrite `layer`'s weight and bias so that layer(x) == bn(layer_before(x)) with bn in eval mode.

    `bn` is any BatchNorm1d/2d/3d with running statistics.

    Ioffe & Szegedy 2015, Alg. 2 (inference BN as an affine map), folded per output channel c:
    s_c = gamma_c / sqrt(var_c + eps);  W'_c = s_c * W_c;  b'_c = s_c * (b_c - mean_c) + beta_c.
    """
    w = layer.weight
    # float64 for the scale: var + eps can be tiny and 1/sqrt amplifies the rounding of float32.
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = torch.zeros_like(mean)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = bn.bias.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)

    new_w = w.detach().double() * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (bias - mean) * scale + shift
    # New Parameters rather than in-place writes: a weight tied to another module must not change under it.
    layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _why_not_foldable(
    bn_node: fx.Node,
    layer_node: object,
    modules: dict[str, nn.Module],
    call_sites: dict[str, int],
    attr_reads: list[str],
) -> str | None:
    """None when `bn_node` can be folded into `layer_node`, else the reason it cannot (for the record)."""
    bn = modules[bn_node.target]
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "batchnorm called with extra arguments"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "batchnorm has no running statistics (track_running_stats=False)"
    if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module":
        return "input is not a module call"
    layer = modules[layer_node.target]
    # Exact types: a subclass (custom forward, parametrized weight) may not compute W x + b, so never fold it.
    expected_bn = next((b for kind, b in _FOLDABLE.items() if type(layer) is kind), None)
    if expected_bn is None:
        return f"input is a {type(layer).__name__}, not a Conv1d/2d/3d or Linear"
    if getattr(layer, "transposed", False):
        return "input is a transposed convolution"
    if not isinstance(bn, expected_bn):
        return f"{type(bn).__name__} after {type(layer).__name__} (channel dims differ)"
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        return f"batchnorm has {bn.num_features} features, layer has {out_channels} outputs"
    if len(layer_node.users) != 1:
        return f"output of {layer_node.target} has {len(layer_node.users)} users"
    if call_sites.get(layer_node.target, 0) != 1:
        return f"module {layer_node.target} is called at {call_sites[layer_node.target]} sites"
    if any(t == layer_node.target or t.startswith(layer_node.target + ".") for t in attr_reads):
        return f"parameters of {layer_node.target} are read elsewhere in the graph"
    return None


def _count_call_sites(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _output_ranks(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
    """Rank of each node's tensor output: from `tensor_meta` when annotated, else from one probe run."""
    if not all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module"):
        device = device_of(gm)
        example = ctx.example_inputs
        example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
        inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in example]
        # eval: a probe in train mode would overwrite the running statistics we are about to fold
        with eval_mode(gm), torch.no_grad():
            try:
                ShapeProp(gm).propagate(*inputs)
            except Exception as err:  # a failed probe only means "rank unknown": skip those folds, never guess
                ctx.debug("fold_bn: shape probe failed: %s", err)
    shapes = {node.name: out_shape(node) for node in gm.graph.nodes}
    return {name: len(shape) for name, shape in shapes.items() if shape is not None}


def _delete_unreferenced(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the folded BN submodules that no remaining node calls or reads (a BN may be shared)."""
    still_used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for target in sorted(targets):
        if not any(u == target or (isinstance(u, str) and u.startswith(target + ".")) for u in still_used):
            gm.delete_submodule(target)
