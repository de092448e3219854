"""Pass `magnitude_prune`: one-shot L1 magnitude pruning of conv and linear weights, unstructured or N:M.

Unstructured: the `sparsity` fraction of weights with the smallest |w| become zero, ranked over all layers at
once (`scope="global"`) or within each layer (`scope="layer"`); exactly `round(sparsity * n)` weights are
chosen, so the achieved sparsity is the request to within one weight. N:M (e.g. "2:4"): in every group of M
consecutive weights along the input-channel dim (at each output channel and kernel position) the N largest
are kept; layers whose input width is not a multiple of M are left dense and listed as skipped. Masks are
baked into the weights (zeros, no mask buffers, no extra ops); channel removal (structured pruning) is the
`prune_channels` pass. A copy of the dense state (every parameter and buffer) is kept in the output's
`gm.meta[DENSE_META]` (fxslim/dense_state.py), so that a later `asr` pass can rebuild the
dense model after other passes ran in between; `asr` drops them again. This file never edits a tensor in
place nor mutates the GraphModule it is given."""

from __future__ import annotations

import re

import torch
from torch import fx, nn

from fxslim.dense_state import prunable_layers, remember_dense
from fxslim.graph.clone import clone_gm
from fxslim.options import Option, Requires, Schema, ignore_option
from fxslim.pass_api import PassContext, PassResult

NAME = "magnitude_prune"
SCOPES = ("global", "layer")


def _parse_pattern(pattern) -> tuple[int, int] | None | bool:
    """(N, M) for an N:M pattern, None for "unstructured", False for anything else."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    return (int(m[1]), int(m[2])) if m and 0 < int(m[1]) < int(m[2]) else False


def _pattern_problem(pattern: str) -> str | None:
    return None if _parse_pattern(pattern) is not False else "must be 'unstructured' or 'N:M' with 0 < N < M"


def _sparsity_fits(o) -> bool:
    nm = _parse_pattern(o["pattern"])
    return not nm or o["sparsity"] is None or abs(o["sparsity"] - (1 - nm[0] / nm[1])) <= 1e-9


OPTIONS = Schema(
    Option("sparsity", float, "fraction of weights set to zero; None: 0.5, or 1 - N/M for an N:M pattern",
           range="[0, 1)", none=True),
    Option("pattern", str, "unstructured, or N:M (e.g. 2:4) along the input dim", check=_pattern_problem,
           valid="'unstructured' or 'N:M' with 0 < N < M"),
    Option("scope", str, "global (one ranking over all layers) or layer (each layer alike); unstructured only",
           choices=SCOPES),
    ignore_option("module names left dense (e.g. the first conv or the classifier)"),
    rules=[Requires(_sparsity_fits, lambda o: f"sparsity={o['sparsity']!r} contradicts pattern {o['pattern']} "
                    f"(which means 1 - N/M); leave sparsity out")],
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    scope: str = "global",
    ignore: list[str] | tuple[str, ...] = (),
) -> PassResult:
    """sparsity: fraction of weights set to zero, in [0, 1) (default 0.5); for N:M it must be None or 1 - N/M.
    pattern: "unstructured" or "N:M" with 0 < N < M (e.g. "2:4", "4:8"), groups along the input dim.
    scope: "global" (one ranking over all layers) or "layer" (each layer to the same sparsity); unstructured only.
    ignore: module names left dense (e.g. the first conv or the classifier).

    record: {"pattern", "scope", "requested", "sparsity" (zeros / weights over the considered layers, exact),
    "zeros", "weights", "layers": {module: sparsity}, "skipped": {module: reason}}."""
    nm = _parse_pattern(pattern)
    if nm:
        sparsity = 1 - nm[0] / nm[1]
    elif sparsity is None:
        sparsity = 0.5
    layers = prunable_layers(gm, ignore)
    out = clone_gm(gm)
    skipped: dict[str, str] = {}
    with torch.no_grad():
        if nm is None:
            masks = _global_masks(layers, sparsity) if scope == "global" else _layer_masks(layers, sparsity)
        else:
            masks, skipped = _nm_masks(layers, *nm)
    remember_dense(out, gm)
    for name, mask in masks.items():
        conv = out.get_submodule(name)
        w = conv.weight
        conv.weight = nn.Parameter(torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype)), w.requires_grad)
    zeros = {name: int((out.get_submodule(name).weight == 0).sum()) for name in layers}
    sizes = {name: m.weight.numel() for name, m in layers.items()}
    total = sum(sizes.values())
    record = {
        "pattern": pattern,
        "scope": scope if nm is None else "group",
        "requested": sparsity,
        "sparsity": sum(zeros.values()) / total if total else 0.0,
        "zeros": sum(zeros.values()),
        "weights": total,
        "layers": {name: zeros[name] / sizes[name] for name in layers},
        "skipped": skipped,
    }
    ctx.debug("magnitude_prune: %s", record)
    return PassResult(out, bool(masks) and any(not bool(m.all()) for m in masks.values()), record)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask over `scores` (flat) that drops exactly the k smallest (ties broken by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores, stable=True)
        keep[order[:k]] = False
    return keep


def _global_masks(layers: dict[str, nn.Module], sparsity: float) -> dict[str, torch.Tensor]:
    if not layers:
        return {}
    flat = torch.cat([m.weight.detach().abs().flatten().float() for m in layers.values()])
    keep = _smallest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, m in layers.items():
        n = m.weight.numel()
        masks[name] = keep[start : start + n].view_as(m.weight)
        start += n
    return masks


def _layer_masks(layers: dict[str, nn.Module], sparsity: float) -> dict[str, torch.Tensor]:
    return {
        name: _smallest(m.weight.detach().abs().flatten().float(), round(sparsity * m.weight.numel())).view_as(m.weight)
        for name, m in layers.items()
    }


def _nm_masks(layers: dict[str, nn.Module], n: int, m: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the n largest |w| in every group of m consecutive input channels (same output, same kernel tap)."""
    masks, skipped = {}, {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        if w.shape[1] % m:
            skipped[name] = f"input width {w.shape[1]} is not a multiple of {m}"
            continue
        along_in = w.abs().movedim(1, -1)  # (out, *kernel, in): groups run along the input dim
        groups = along_in.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        masks[name] = keep.view(along_in.shape).movedim(-1, 1)
    return masks, skipped
