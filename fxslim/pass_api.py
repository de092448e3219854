"""What every pass sees and returns. A pass is a module in `passes/` with a `NAME` string and one entry
point `run(gm, ctx, **options) -> PassResult`; its keyword-only options are the recipe options, declared with
their types and ranges in the pass's `OPTIONS` schema (fxslim/options.py), which checks them before any pass
runs. A pass must never mutate the GraphModule it is given."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

log = logging.getLogger("fxslim")


def debug_enabled() -> bool:
    """`FXSLIM_DEBUG=1` makes passes log their decisions; it costs nothing when off."""
    return os.environ.get("FXSLIM_DEBUG", "") not in ("", "0")


@dataclass
class PassContext:
    """Everything a pass may need besides the graph: inputs, data, seed, device, the untouched reference."""

    example_inputs: tuple
    data: Iterable | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dump_dir: Path | None = None
    reference: fx.GraphModule | None = None  # the traced input model, never modified (teacher for KD)

    def debug(self, msg: str, *args: Any) -> None:
        if debug_enabled():
            log.warning("[fxslim] " + msg, *args)

    def require_data(self, pass_name: str) -> Iterable:
        """The calibration/training batches, or a PassError naming the pass that needs them."""
        from fxslim.errors import PassError

        if self.data is None:
            raise PassError("needs data=: an iterable of (x, y) batches (e.g. a DataLoader)", pass_name=pass_name)
        return self.data


@dataclass
class PassResult:
    """A pass's answer: the NEW module, whether anything changed, and pass-specific details for the report."""

    module: fx.GraphModule
    changed: bool
    record: dict = field(default_factory=dict)
