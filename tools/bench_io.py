"""What every benchmark in tools/ does with its figures, and where: one JSON line appended to `--json`, the
markdown page written to `--write-md` and a chart saved to its path (folders made first), and a run's own charts
under `runs/<bench>/` (git-ignored). It must never choose a path in docs/: the committed pages and figures there
change only through an explicit `--write-md` or `--plot` path, so that a quick run cannot overwrite them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUNS = Path(__file__).resolve().parents[1] / "runs"


def run_path(bench: str, name: str) -> Path:
    """`runs/<bench>/<name>`: where a run writes a file that no flag sent elsewhere."""
    return RUNS / bench / name


def md_link(target: str | Path, md_path: str | Path) -> str:
    """`target` relative to the folder of the markdown page `md_path`: an image link that stays true wherever
    the run wrote the page and the figure."""
    return os.path.relpath(Path(target).resolve(), Path(md_path).resolve().parent)


def write_outputs(figures: dict, json_path: str | None, md_path: str | None, markdown: str | None) -> None:
    """Append `figures` as one JSON line to `json_path` and write `markdown` to `md_path` (each when given)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "a") as f:
            f.write(json.dumps(figures) + "\n")
    if md_path and markdown is not None:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown)


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend, imported on first use: the benchmarks run headless and draw only
    into files, and a run that draws nothing does not pay for importing matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path, dpi: int = 120, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay `fig` out (inside `rect` of the figure when given), write it to `path` (folders made first) and close
    it; returns `path`."""
    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
