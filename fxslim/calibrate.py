"""BatchNorm recalibration, shared by the passes that need it (`bn_recalibrate`, `asr`): reset the running
statistics of every BatchNorm and re-estimate them on calibration batches. Only the BN buffers change: no
gradient, no weight, no dropout or other train-mode behaviour. It changes the module it is given in place;
callers pass a copy. It never decides whether to recalibrate."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from fxslim.errors import PassError
from fxslim.module_state import device_of, eval_mode
from fxslim.symmetry import pool_statistics_
from fxslim.training import split_batch

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def has_running_stats(m: nn.Module) -> bool:
    is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
    return is_bn and m.track_running_stats and m.running_mean is not None


def recalibrate_bn_(
    gm: nn.Module, data: Iterable, *, batches: int, momentum: float | None, device: torch.device
) -> dict:
    """Re-estimate, in place, the statistics of every BN of `gm` on the first `batches` batches of `data`.

    momentum None is the cumulative average over all batches. A BN the data never reaches (a branch not
    taken) keeps its old statistics. A model with a declared symmetry (a C4 e2cnn model: each field shares one
    InnerBatchNorm statistic) gets each field's pooled statistics, so its rotation invariance survives.
    Returns {"bn_layers", "batches", "momentum", "unused"}."""
    bns = {name: m for name, m in gm.named_modules() if has_running_stats(m)}
    if not bns:
        return {"bn_layers": 0, "batches": 0, "momentum": momentum, "unused": []}
    home = device_of(gm)
    saved = {name: (bn.momentum, _stats(bn)) for name, bn in bns.items()}
    gm.to(device)
    used = 0
    with eval_mode(gm):
        for bn in bns.values():
            bn.reset_running_stats()
            bn.momentum = momentum
            bn.train()  # only the BNs: dropout etc. stay in eval so the statistics see inference activations
        try:
            with torch.no_grad():
                for batch in itertools.islice(data, batches):
                    inputs, _ = split_batch(batch)
                    gm(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
                    used += 1
        finally:
            for name, bn in bns.items():
                bn.momentum = saved[name][0]
    if used == 0:
        raise PassError("the calibration data yielded no batches")
    unused = sorted(name for name, bn in bns.items() if int(bn.num_batches_tracked) == 0)
    for name in unused:
        _restore_stats(bns[name], saved[name][1])
    pool_statistics_(gm)  # a model with fields (e2cnn): per-channel statistics -> each field's pooled ones
    gm.to(home)
    return {"bn_layers": len(bns) - len(unused), "batches": used, "momentum": momentum, "unused": unused}


def _stats(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(bn, k).detach().clone() for k in _STAT_BUFFERS}


def _restore_stats(bn: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    for k, v in stats.items():
        getattr(bn, k).copy_(v)
