"""Where fxslim keeps what it caches on disk: `cache_root()` is `$FXSLIM_CACHE`, by default `~/.cache/fxslim`.

The core (measured layer latencies, `fxslim.latency`) and the zoo (trained checkpoints, `fxslim.zoo.train`)
both cache under it; this file lives in the core so that the core never imports the zoo. It never creates
or deletes anything."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$FXSLIM_CACHE` when set and not empty, else `~/.cache/fxslim`."""
    root = os.environ.get("FXSLIM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fxslim"
