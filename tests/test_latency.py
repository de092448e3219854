"""fxslim.latency: one module timed alone in onnxruntime, cached on disk by type, config, shape, ORT version."""

from __future__ import annotations

import pytest
from torch import nn

from fxslim import latency


def test_module_latency_measures_once_then_reads_the_table(tmp_path, monkeypatch):
    table = latency.LatencyTable(tmp_path / "lat.json")
    small, big = nn.Conv2d(4, 4, 1), nn.Conv2d(64, 64, 3, padding=1)
    t_small = latency.module_latency(small, (1, 4, 8, 8), table=table, budget_s=0.05)
    t_big = latency.module_latency(big, (1, 64, 32, 32), table=table, budget_s=0.05)
    assert 0 < t_small < t_big  # ~150x the MACs
    assert len(table) == 2

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency, "measure", fail)
    reread = latency.LatencyTable(tmp_path / "lat.json")  # saved to disk, loaded by a new table
    assert latency.module_latency(nn.Conv2d(4, 4, 1), (1, 4, 8, 8), table=reread) == t_small  # new weights, same key
    with pytest.raises(AssertionError, match="measured again"):
        latency.module_latency(small, (1, 4, 16, 16), table=reread)  # another shape is another key


def test_keys_separate_config_and_shape():
    k = latency.latency_key(nn.Conv2d(4, 4, 3), (1, 4, 8, 8))
    assert k != latency.latency_key(nn.Conv2d(4, 4, 3, stride=2), (1, 4, 8, 8))
    assert k != latency.latency_key(nn.Conv2d(4, 4, 3), (1, 4, 9, 8))
    assert "ort=" in k and "(1, 4, 8, 8)" in k
    chain = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 3))
    assert "Sequential" in latency.latency_key(chain, (1, 4, 8, 8))


def test_table_save_merges_with_other_writers(tmp_path):
    path = tmp_path / "lat.json"
    a, b = latency.LatencyTable(path), latency.LatencyTable(path)
    a.put("x", 1.0)
    a.save()
    b.put("y", 2.0)
    b.save()
    merged = latency.LatencyTable(path)
    assert merged.get("x") == 1.0 and merged.get("y") == 2.0 and merged.get("z") is None
