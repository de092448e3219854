"""Pass `bn_recalibrate`: re-estimate the running mean and variance of every BatchNorm of a copy of the model
on calibration batches (after pruning or fusion the old statistics describe channels that no longer exist).
Only the BN buffers change: it never computes gradients, never touches a weight, never lets dropout or any
other train-mode behaviour run, and never mutates the GraphModule it is given. A C4 e2cnn model (fields of
4 channels that share one InnerBatchNorm statistic) gets each field's pooled statistics, so its rotation
invariance survives the recalibration."""

from __future__ import annotations

import copy

from torch import fx

from fxslim.calibrate import has_running_stats, recalibrate_bn_
from fxslim.options import Option, Schema
from fxslim.pass_api import PassContext, PassResult

NAME = "bn_recalibrate"

OPTIONS = Schema(
    Option("calib_batches", int, "calibration batches run (fewer when the data runs out)", range=">= 1",
           aliases=("batches",)),
    Option("momentum", float, "BN momentum while calibrating; None: the cumulative average over all batches",
           range="(0, 1]", none=True),
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    calib_batches: int = 32,
    momentum: float | None = None,
) -> PassResult:
    """Reset and re-estimate the BatchNorm running statistics on up to `calib_batches` batches of `ctx.data`.

    calib_batches: how many calibration batches to run (at least 1; fewer when the data runs out).
    momentum: BN momentum during calibration; None (default) is the cumulative average over all batches.

    record: {"bn_layers": int, "batches": int, "momentum": float | None, "unused": [bn names never reached]}.
    A model without BatchNorm is returned unchanged (changed=False) without reading the data.
    """
    gm = copy.deepcopy(gm)
    if not any(has_running_stats(m) for m in gm.modules()):
        return PassResult(gm, changed=False, record={"bn_layers": 0, "batches": 0, "momentum": momentum})
    record = recalibrate_bn_(gm, ctx.require_data(NAME), batches=calib_batches, momentum=momentum, device=ctx.device)
    ctx.debug("bn_recalibrate: %d BN layers on %d batches (unreached: %s)", record["bn_layers"], record["batches"],
              record["unused"])
    return PassResult(gm, changed=record["bn_layers"] > 0, record=record)
