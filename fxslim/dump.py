"""Human-readable IR dumps: one text file per pipeline step (`000_input.txt`, `001_prune_channels.txt`, ...)
with the totals, one aligned row per node (name, op, target, output shape, params, MACs) and a diff
against the previous dump (`+` added, `-` removed, `~` output shape changed). The table is also the
machine-readable form: the diff is computed by parsing the previous file's table back, so dumps can be
compared from disk alone. This file only reads graphs and costs: it must never change a GraphModule,
and it never recomputes costs (the caller passes the `Cost` it already has)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import fx

from fxslim.graph.cost import Cost, NodeCost
from fxslim.graph.shape import describe_target, format_shape, out_shape

_COLUMNS = ("name", "op", "target", "shape", "params", "MACs")
_NUMERIC = {"params", "MACs"}
_TABLE_END = "(end of table)"
_DIFF_TITLE = "diff vs "


@dataclass(frozen=True)
class Row:
    """One node as the dump shows it; also what a parsed dump gives back."""

    name: str
    op: str
    target: str
    shape: str
    params: int
    macs: int


@dataclass(frozen=True)
class Dump:
    """A parsed dump file: its title, header totals and table rows (in graph order)."""

    title: str
    params: int
    macs: int
    nodes: int
    rows: list[Row]


def _shape_text(node: fx.Node) -> str:
    shape = out_shape(node)
    if shape is not None:
        return format_shape(shape)
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):  # a node returning several tensors, e.g. attention + weights
        return "(" + ", ".join(format_shape(tuple(m.shape)) if hasattr(m, "shape") else "-" for m in meta) + ")"
    return "-"


def rows_of(gm: fx.GraphModule, cost: Cost) -> list[Row]:
    """The table rows for `gm`; costs come from `cost.per_node`, else from `node.meta['cost']`."""
    rows = []
    for node in gm.graph.nodes:
        c = cost.per_node.get(node.name) or node.meta.get("cost") or NodeCost(0, 0)
        rows.append(Row(node.name, node.op, describe_target(gm, node), _shape_text(node), c.params, c.macs))
    return rows


def _cells(row: Row) -> list[str]:
    return [row.name, row.op, row.target, row.shape, f"{row.params:,}", f"{row.macs:,}"]


def _align(table: list[list[str]], numeric: list[bool]) -> tuple[list[str], list[int]]:
    """Left-align text columns and right-align numeric ones, two spaces apart, no trailing blanks;
    also returns the column widths."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for r in table:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines, widths


def _table(rows: list[Row]) -> list[str]:
    """Header, a dashes line whose runs are the column spans `parse_ir` cuts at, then one line per row."""
    lines, widths = _align([list(_COLUMNS)] + [_cells(r) for r in rows], [c in _NUMERIC for c in _COLUMNS])
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def _header(title: str, params: int, macs: int, nodes: int) -> list[str]:
    return [f"# {title}", f"params: {params:,}  MACs: {macs:,}  nodes: {nodes}"]


def _change(old: int, new: int) -> str:
    if old == new:
        return f"{new:,} (unchanged)"
    pct = f" ({(new - old) / old:+.1%})" if old else ""
    return f"{old:,} -> {new:,}{pct}"


def _diff(previous: Dump, rows: list[Row]) -> list[str]:
    # A node is "the same" when its name, op and target match; a name reused for another op (e.g. a
    # Sequential index after a layer was removed) is reported as removed + added, not as a reshape.
    old = {(r.name, r.op, r.target): r for r in previous.rows}
    new = {(r.name, r.op, r.target): r for r in rows}
    removed = [r for k, r in old.items() if k not in new]
    added = [r for k, r in new.items() if k not in old]
    reshaped = [(old[k], r) for k, r in new.items() if k in old and old[k].shape != r.shape]
    lines = [
        f"{_DIFF_TITLE}{previous.title}: {len(added)} added, {len(removed)} removed, {len(reshaped)} changed shape",
    ]
    table = [["-", r.name, r.op, r.target, r.shape] for r in removed]
    table += [["+", r.name, r.op, r.target, r.shape] for r in added]
    table += [["~", n.name, n.op, n.target, f"{o.shape} -> {n.shape}"] for o, n in reshaped]
    if table:
        lines += _align(table, [False] * 5)[0]
    else:
        lines.append("(no changes)")
    return lines


def format_ir(gm: fx.GraphModule, cost: Cost, title: str, previous: str | None = None) -> str:
    """The dump text for `gm`: header with totals, the node table, and the diff against `previous`
    (the text of the previous dump, or None for the first one)."""
    rows = rows_of(gm, cost)
    lines = _header(title, cost.params, cost.macs, len(rows))
    prev, unreadable = None, ""
    if previous is not None:
        # A damaged previous file must not stop a compression run; the dump says why it has no diff.
        try:
            prev = parse_ir(previous)
        except ValueError as e:
            unreadable = f"(previous dump unreadable, no diff: {e})"
    if prev is not None:
        lines.append(
            f"vs {prev.title}: params {_change(prev.params, cost.params)}, "
            f"MACs {_change(prev.macs, cost.macs)}, nodes {_change(prev.nodes, len(rows))}"
        )
    if cost.uncounted:
        lines.append(f"MACs not counted (no rule) for: {', '.join(cost.uncounted)}")
    lines += ["", *_table(rows), _TABLE_END, ""]
    if prev is not None:
        lines += _diff(prev, rows)
    else:
        lines.append(unreadable or "(first dump: no diff)")
    return "\n".join(lines) + "\n"


def dump_ir(
    gm: fx.GraphModule, cost: Cost, path: str | Path, title: str, previous_path: str | Path | None = None
) -> Path:
    """Write `format_ir(...)` to `path` (parent folders created), diffing against the dump at
    `previous_path` when given; returns the path written."""
    path = Path(path)
    previous = Path(previous_path).read_text(encoding="utf-8") if previous_path is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_ir(gm, cost, title, previous), encoding="utf-8")
    return path


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _spans(dashes: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, ch in enumerate(dashes + " "):
        if ch == "-" and start is None:
            start = i
        elif ch != "-" and start is not None:
            spans.append((start, i))
            start = None
    return spans


def parse_ir(text: str) -> Dump:
    """Read a dump written by `format_ir` back into its title, totals and rows.

    Columns are cut at the spans of the dashes line, so targets and shapes may contain spaces.
    Raises ValueError when `text` is not a dump."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith("# "):
        raise ValueError("not an fxslim IR dump: first line must be '# <title>'")
    fields = lines[1].replace(":", "").split()
    totals = dict(zip(fields[0::2], fields[1::2], strict=False))
    try:
        start = next(i for i, line in enumerate(lines) if line.split() == list(_COLUMNS))
        end = lines.index(_TABLE_END, start)
    except (StopIteration, ValueError):
        raise ValueError("not an fxslim IR dump: no node table found") from None
    spans = _spans(lines[start + 1])
    if len(spans) != len(_COLUMNS):
        raise ValueError(f"fxslim IR dump: expected {len(_COLUMNS)} columns, found {len(spans)}")
    cuts = [s for s, _ in spans] + [None]
    rows = []
    for line in lines[start + 2 : end]:
        cells = [line[cuts[i] : cuts[i + 1]].strip() for i in range(len(_COLUMNS))]
        rows.append(Row(cells[0], cells[1], cells[2], cells[3], _int(cells[4]), _int(cells[5])))
    return Dump(
        lines[0][2:],
        _int(totals.get("params", "0")),
        _int(totals.get("MACs", "0")),
        _int(totals.get("nodes", "0")),
        rows,
    )
