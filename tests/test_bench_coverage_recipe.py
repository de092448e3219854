"""tools/bench_coverage.py --recipe: another data-free recipe through the same stages and checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_coverage as bc  # noqa: E402

LOWRANK = '[{"pass": "lowrank_conv", "method": "tucker", "rank": 0.5}]'


def test_recipe_argument_forms():
    assert bc.recipe_of(bc.parse_args([])) is None
    assert bc.recipe_of(bc.parse_args(["--recipe", LOWRANK])) == [
        {"pass": "lowrank_conv", "method": "tucker", "rank": 0.5}
    ]
    assert bc.recipe_of(bc.parse_args(["--recipe", "prune50"])) == "prune50"  # built-in: fxslim resolves it
    with pytest.raises(SystemExit):
        bc.parse_args(["--recipe", LOWRANK, "--torch-pruning"])
    with pytest.raises(SystemExit):  # would overwrite the pruning recipe's page
        bc.parse_args(["--recipe", LOWRANK, "--write-md"])
    assert bc.parse_args(["--recipe", LOWRANK, "--write-md", "out.md"]).write_md == Path("out.md")
    with pytest.raises(SystemExit):
        bc.parse_args(["--recipe", '[{"pass": "lowrank_conv",]'])


def test_a_lowrank_recipe_runs_through_every_stage():
    rec = bc.bench_model("mobilenet_v3_small", recipe=bc.recipe_of(bc.parse_args(["--recipe", LOWRANK])))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["changed"] and rec["macs_ratio"] < 0.9  # its full convs became Tucker-2 chains
    assert rec["params_ratio"] < 1.0
    assert rec["onnx_err"] < 1e-4


def test_an_unknown_pass_fails_at_the_rewrite_stage():
    rec = bc.bench_model("mobilenet_v3_small", recipe=[{"pass": "no_such_pass"}])
    assert rec["status"] == "fail" and rec["stage"] == "rewrite"
    assert "no_such_pass" in rec["error"]
