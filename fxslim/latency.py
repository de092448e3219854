"""Per-layer latency on this machine, measured with onnxruntime and cached on disk.

`module_latency(module, input_shape)` exports one nn.Module alone to ONNX (random input of that shape, the
module's own weights) and times it with `fxslim.export.ort_latency`: median process CPU seconds of one run
on one ORT intra-op thread (docs/notes/facts.md: the most stable measure here). Results are cached in a
`LatencyTable` (a JSON file, by default `cache_root()/latency.json`) keyed by the module type, its
configuration (its repr: layer types, sizes, strides, ...; not its weights, which do not change dense
kernels' time), the input shape and the onnxruntime version. Compression passes use it to compare layer
choices (low-rank chains, pruned widths) by measured time. This file never changes a module."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from fxslim.cache import cache_root


def latency_key(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The cache key: module type, its configuration (repr on one line), input shape, onnxruntime version."""
    config = " ".join(repr(module).split())
    return f"{type(module).__name__} {config} @ {tuple(int(d) for d in input_shape)} ort={ort.__version__}"


class LatencyTable:
    """Measured seconds per `latency_key`, loaded from and saved to a JSON file (merged on save, so that
    several processes filling the same table keep each other's entries)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_root() / "latency.json"
        self._entries: dict[str, float] = self._read()
        self._dirty = False

    def _read(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (FileNotFoundError, json.JSONDecodeError, AttributeError, ValueError):
            return {}

    def get(self, key: str) -> float | None:
        return self._entries.get(key)

    def put(self, key: str, seconds: float) -> None:
        self._entries[key] = float(seconds)
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        if not self._dirty:
            return
        merged = {**self._read(), **self._entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # write-then-rename: never half a file
        tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self._entries, self._dirty = merged, False


def measure(module: nn.Module, input_shape: tuple[int, ...], *, budget_s: float = 0.2) -> float:
    """Median process CPU seconds of one onnxruntime run of `module` alone on an input of `input_shape`."""
    from fxslim.export import export_onnx, ort_latency  # lazy: the exporter pulls in onnx tooling

    x = torch.randn(*input_shape)
    with tempfile.TemporaryDirectory(prefix="fxslim-latency-") as tmp:
        path = Path(tmp) / "layer.onnx"
        export_onnx(module.eval(), (x,), path)
        return ort_latency({"layer": path}, x.numpy(), budget_s=budget_s, min_samples=5)["layer"]


_DEFAULT: LatencyTable | None = None


def default_table() -> LatencyTable:
    """The process-wide table on `cache_root()/latency.json`."""
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.path != cache_root() / "latency.json":
        _DEFAULT = LatencyTable()
    return _DEFAULT


def module_latency(
    module: nn.Module,
    input_shape: tuple[int, ...],
    *,
    table: LatencyTable | None = None,
    budget_s: float = 0.2,
    refresh: bool = False,
    save: bool = True,
    key: str | None = None,
) -> float:
    """Seconds per run of `module` on `input_shape` on this machine, from `table` (default: the on-disk
    cache) or measured and stored there. refresh=True measures again; save=False leaves the file alone
    (call `table.save()` after a batch of measurements); `key` replaces `latency_key(module, input_shape)`
    for a module whose repr does not say what it computes (a one-node GraphModule)."""
    table = default_table() if table is None else table
    key = latency_key(module, input_shape) if key is None else key
    seconds = None if refresh else table.get(key)
    if seconds is None:
        seconds = measure(module, input_shape, budget_s=budget_s)
        table.put(key, seconds)
        if save:
            table.save()
    return seconds
