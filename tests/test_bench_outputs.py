"""Where the benchmarks in tools/ write: a run's charts go to runs/<bench>/, and docs/ changes only through an
explicit --write-md or --plot path, so that a --quick run never overwrites the committed pages and figures."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
DOCS = TOOLS.parent / "docs"
sys.path.insert(0, str(TOOLS))

import bench_equivariant  # noqa: E402
import bench_fcos  # noqa: E402
import bench_io  # noqa: E402
import bench_latency  # noqa: E402
import bench_lrf  # noqa: E402


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(bench_io, "RUNS", tmp_path / "runs")
    return tmp_path / "runs"


def _docs_digest() -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(DOCS.rglob("*")) if p.is_file()}


def test_default_chart_paths_are_in_the_run_folder(runs):
    assert bench_lrf.parse_args([]).plot == str(runs / "lrf" / "lrf_methods.png")
    quick = bench_lrf.parse_args(["--quick"])
    assert (quick.plot, quick.curves) == (
        str(runs / "lrf" / "lrf_quick_methods.png"),
        str(runs / "lrf" / "lrf_quick_curves.png"),
    )
    assert bench_lrf.parse_args(["--curves", "docs/lrf_curves.png"]).curves == "docs/lrf_curves.png"
    assert bench_latency.parse_args([]).plot is None  # no chart unless asked for
    assert bench_latency.parse_args(["--plot"]).plot == runs / "latency" / "latency_speed_per_mac.png"
    assert bench_equivariant.parser().parse_args([]).plot == str(
        runs / "equivariant" / "equivariant_accuracy_vs_params.png"
    )


def test_image_links_are_relative_to_the_page():
    assert bench_io.md_link(DOCS / "fcos_lacd_probes.png", DOCS / "results" / "fcos.md") == "../fcos_lacd_probes.png"
    assert bench_io.md_link("runs/x/a.png", "runs/x/a.md") == "a.png"


def test_a_saved_chart_makes_its_folder_and_is_closed(tmp_path):
    plt = bench_io.pyplot()
    fig, _ = plt.subplots()
    path = tmp_path / "new" / "chart.png"
    assert bench_io.save_figure(fig, path, dpi=50) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # a run drawing many charts does not keep them all in memory


def _fcos_figures() -> dict:
    rows = [
        {
            "model": "cnn1d",
            "epsilon": eps,
            "method": method,
            "params_ratio": 0.5,
            "macs_ratio": macs,
            "accuracy": 0.5,
            "base_accuracy": 0.52,
            "accuracy_snr_ge10": 0.7,
            "base_accuracy_snr_ge10": 0.72,
            "ort_ratio_b1": 0.8,
            "ort_ratio_b64": 0.6,
        }
        for eps, macs in ((0.5, 0.3), (0.9, 0.1))
        for method in ("fcos", "l1")
    ]
    probes = [
        {
            "model": "cnn1d",
            "epsilon": eps,
            "input": 0.3,
            "dropped": ["b1"],
            "probes": [{"block": "b0", "accuracy": 0.4}, {"block": "b1", "accuracy": 0.41}],
        }
        for eps in (0.5, 0.9)
    ]
    return {
        "bench": "fcos",
        "date": "2026-12-07",
        "quick": True,
        "beta": 0.005,
        "torch": "x",
        "wall_seconds": 1.0,
        "config": {"models": ["cnn1d"], "n": 12, "base_epochs": 2, "short": 1, "long": 1},
        "rows": rows,
        "probes": probes,
    }


def test_fcos_writes_its_charts_to_the_run_folder_and_docs_only_when_told(tmp_path, runs, capsys):
    jsonl = tmp_path / "fcos.jsonl"
    jsonl.write_text(json.dumps(_fcos_figures()) + "\n")
    before = _docs_digest()

    render = ["--render", str(jsonl), "--methods", "fcos,l1"]  # tp_l1 would need Torch-Pruning installed
    assert bench_fcos.main(render) == 0
    assert sorted(p.name for p in (runs / "fcos").iterdir()) == ["fcos_accuracy_vs_macs.png", "fcos_lacd_probes.png"]
    assert _docs_digest() == before
    assert "cnn1d" in capsys.readouterr().out  # the table is still printed

    page, prefix = tmp_path / "page" / "fcos.md", tmp_path / "figs" / "fcos"
    bench_fcos.main([*render, "--write-md", str(page), "--plot-prefix", str(prefix)])
    assert "](../figs/fcos_accuracy_vs_macs.png)" in page.read_text()
    assert (tmp_path / "figs" / "fcos_lacd_probes.png").exists()
