"""What every benchmark in tools/ does with its figures: one JSON line appended to `--json`, the markdown page
written to `--write-md` (its folder made first)."""

from __future__ import annotations

import json
from pathlib import Path


def write_outputs(figures: dict, json_path: str | None, md_path: str | None, markdown: str | None) -> None:
    """Append `figures` as one JSON line to `json_path` and write `markdown` to `md_path` (each when given)."""
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(figures) + "\n")
    if md_path and markdown is not None:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown)
