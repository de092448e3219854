"""tools/bench_coverage.py's --repeat bookkeeping: how many runs, when it stops, and that a failing repeat
keeps the first run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_coverage as bc  # noqa: E402


def test_repeats_up_to_n_runs_while_the_total_is_short():
    calls = []

    def run() -> float:
        calls.append(1)
        return 0.5

    assert bc._repeat_timed(0.25, 3, run) == ([0.25, 0.5, 0.5], None)
    assert len(calls) == 2
    assert bc._repeat_timed(0.25, 1, run) == ([0.25], None)
    assert len(calls) == 2


def test_repeats_stop_once_the_runs_total_the_limit():
    runs, err = bc._repeat_timed(bc.REPEAT_UNDER_S * 0.6, 5, lambda: bc.REPEAT_UNDER_S * 0.6)
    assert runs == [bc.REPEAT_UNDER_S * 0.6] * 2 and err is None


def test_a_failing_repeat_keeps_the_first_run_and_says_why():
    def run() -> float:
        raise RuntimeError("out of memory\nmore")

    assert bc._repeat_timed(0.3, 3, run) == ([0.3], "RuntimeError: out of memory")


def test_ratio_of_minima_pairs_each_tool_with_its_own_fastest_run():
    rec = {"status": "ok", "compress_cpu_min_s": 0.2, "analysis_pruning_cpu_min_s": 0.1,
           "tp": {"status": "ok", "cpu_s": 0.9, "cpu_min_s": 0.6}}
    assert bc._speedup_min(rec) == pytest.approx(3.0)
    assert bc._speedup_min(rec, "analysis_pruning_cpu_min_s") == pytest.approx(6.0)
    summary = bc._min_summary([rec])
    assert summary["repeated"] == 1 and summary["median_speedup_min"] == pytest.approx(3.0)
    assert bc._min_summary([{"status": "ok", "compress_cpu_s": 0.2, "tp": {"status": "ok", "cpu_s": 0.5}}]) == {}


def test_quick_runs_get_a_shorter_peer_time_limit_unless_one_is_given():
    assert bc.parse_args(["--quick"]).peer_timeout == 60.0
    assert bc.parse_args([]).peer_timeout == 300.0
    assert bc.parse_args(["--quick", "--peer-timeout", "120"]).peer_timeout == 120.0
