"""Pass `bn_recalibrate`: re-estimate the running mean and variance of every BatchNorm of a copy of the model
on calibration batches (after pruning or fusion the old statistics describe channels that no longer exist).
Only the BN buffers change: it never computes gradients, never touches a weight, never lets dropout or any
other train-mode behaviour run, and never mutates the GraphModule it is given. A C4 e2cnn model (fields of
4 channels that share one InnerBatchNorm statistic) gets each field's pooled statistics, so its rotation
invariance survives the recalibration."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import fx, nn

from fxslim import e2cnn_adapter
from fxslim.errors import PassError, RecipeError
from fxslim.pass_api import PassContext, PassResult
from fxslim.training import split_batch

NAME = "bn_recalibrate"


def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    batches: int = 32,
    momentum: float | None = None,
) -> PassResult:
    """Reset and re-estimate the BatchNorm running statistics on up to `batches` batches of `ctx.data`.

    batches: how many calibration batches to run (at least 1; fewer when the data runs out).
    momentum: BN momentum during calibration; None (default) is the cumulative average over all batches.

    record: {"bn_layers": int, "batches": int, "momentum": float | None, "unused": [bn names never reached]}.
    A model without BatchNorm is returned unchanged (changed=False) without reading the data.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise RecipeError(f"pass {NAME!r}: batches must be an integer >= 1, got {batches!r}")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise RecipeError(f"pass {NAME!r}: momentum must be None or in (0, 1], got {momentum!r}")

    gm = copy.deepcopy(gm)
    bns = {name: m for name, m in gm.named_modules() if _has_running_stats(m)}
    if not bns:
        return PassResult(gm, changed=False, record={"bn_layers": 0, "batches": 0, "momentum": momentum})
    data = ctx.require_data(NAME)

    home = _device_of(gm)
    training = {name: m.training for name, m in gm.named_modules()}
    saved = {name: (bn.momentum, _stats(bn)) for name, bn in bns.items()}
    gm.to(ctx.device).eval()
    for bn in bns.values():
        bn.reset_running_stats()
        bn.momentum = momentum
        bn.train()  # only the BNs: dropout etc. stay in eval so the statistics see inference activations

    used = 0
    try:
        with torch.no_grad():
            for batch in itertools.islice(data, batches):
                inputs, _ = split_batch(batch)
                gm(*(x.to(ctx.device) if isinstance(x, torch.Tensor) else x for x in inputs))
                used += 1
    finally:
        for name, m in gm.named_modules():
            m.training = training[name]
        for name, bn in bns.items():
            bn.momentum = saved[name][0]
    if used == 0:
        raise PassError(f"pass {NAME!r}: ctx.data yielded no batches")

    # A BN the data never reached (a branch not taken) keeps its old statistics, not mean 0 / var 1.
    unused = sorted(name for name, bn in bns.items() if int(bn.num_batches_tracked) == 0)
    for name in unused:
        _restore_stats(bns[name], saved[name][1])
    if e2cnn_adapter.can_symmetrize(gm):
        e2cnn_adapter.pool_field_statistics_(gm)  # per-channel statistics -> each field's pooled ones
    gm.to(home)
    ctx.debug("bn_recalibrate: %d BN layers on %d batches (unreached: %s)", len(bns), used, unused)
    record = {"bn_layers": len(bns) - len(unused), "batches": used, "momentum": momentum, "unused": unused}
    return PassResult(gm, changed=len(unused) < len(bns), record=record)


def _device_of(gm: nn.Module) -> torch.device:
    return next((t.device for t in itertools.chain(gm.parameters(), gm.buffers())), torch.device("cpu"))


def _has_running_stats(m: nn.Module) -> bool:
    is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
    return is_bn and m.track_running_stats and m.running_mean is not None


_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _stats(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(bn, k).detach().clone() for k in _STAT_BUFFERS}


def _restore_stats(bn: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    for k, v in stats.items():
        getattr(bn, k).copy_(v)
