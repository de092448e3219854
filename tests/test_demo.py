"""The main job (`make demo`) end to end in its --quick form, with a private cache folder."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from fxslim.demo import main

    monkeypatch.setenv("FXSLIM_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "out")]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    for row in ("test accuracy", "accuracy, SNR >= 10 dB", "params", "MACs (batch 1)", "ONNX file, KB", "ORT latency"):
        assert row in out
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.onnx", "original.onnx", "accuracy_vs_snr.png", "summary.json", "ir"} <= files
    assert len(list((tmp_path / "out" / "ir").glob("*.txt"))) == 6  # input + 5 passes
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["macs"][1] < 0.5 * summary["macs"][0]
    assert max(summary["onnx_max_abs_error"].values()) < 1e-4
    assert len(list((tmp_path / "cache" / "checkpoints").glob("cnn1d-amr-*.pt"))) == 1
