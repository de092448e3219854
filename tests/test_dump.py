"""IR dumps: header totals, one row per node, and the +/-/~ diff computed from the previous file on disk."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.dump import dump_ir, format_ir, parse_ir, rows_of
from fxslim.graph.cost import annotate


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class After(nn.Module):
    """Before with bn1 removed, conv1 pruned to 4 channels, and a tanh added after conv2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.tanh(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


X = torch.randn(1, 3, 16, 16)


def traced(model: nn.Module):
    gm = fx.symbolic_trace(model)
    return gm, annotate(gm, (X,))


def diff_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("diff vs "))
    return lines[start:]


def test_first_dump_header_and_rows(tmp_path):
    gm, cost = traced(Before())
    path = dump_ir(gm, cost, tmp_path / "dumps" / "000_input.txt", "000_input")
    assert path == tmp_path / "dumps" / "000_input.txt"
    text = path.read_text()
    lines = text.splitlines()
    # params: conv1 224 + bn1 16 + conv2 584 + fc 90; MACs: conv1 55296 + bn1 2048 + conv2 147456
    # + pool 2048 + fc 80
    assert lines[:2] == ["# 000_input", "params: 914  MACs: 206,928  nodes: 9"]
    dump = parse_ir(text)
    assert (dump.title, dump.params, dump.macs, dump.nodes) == ("000_input", 914, 206_928, 9)
    assert [r.name for r in dump.rows] == ["x", "conv1", "bn1", "relu", "conv2", "pool", "flatten", "fc", "output"]
    assert dump.rows[1].target == "conv1 (Conv2d)"
    assert dump.rows[3].target == "F.relu"
    assert dump.rows[6].target == "Tensor.flatten"
    assert (dump.rows[1].shape, dump.rows[1].params, dump.rows[1].macs) == ("1x8x16x16", 224, 55_296)
    assert "(first dump: no diff)" in text


def test_columns_are_aligned():
    gm, cost = traced(Before())
    lines = format_ir(gm, cost, "000_input").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    table = lines[header : header + 2 + 9]
    op_col = lines[header].index("op")
    assert all(line[op_col - 2 : op_col] == "  " and line[op_col] != " " for line in table[2:])
    # numbers are right-aligned: every row ends at the same column as the "MACs" header
    assert {len(line) for line in table} == {len(lines[header])}


def test_diff_against_previous_file(tmp_path):
    gm0, cost0 = traced(Before())
    gm1, cost1 = traced(After())
    first = dump_ir(gm0, cost0, tmp_path / "000_input.txt", "000_input")
    second = dump_ir(gm1, cost1, tmp_path / "001_prune_channels.txt", "001_prune_channels", first)
    text = second.read_text()
    lines = text.splitlines()
    # params: conv1 112 + conv2 296 + fc 90; MACs: conv1 27648 + conv2 73728 + pool 2048 + fc 80
    assert lines[1] == "params: 498  MACs: 103,504  nodes: 9"
    assert lines[2] == (
        "vs 000_input: params 914 -> 498 (-45.5%), MACs 206,928 -> 103,504 (-50.0%), nodes 9 (unchanged)"
    )
    assert len(parse_ir(text).rows) == 9
    diff = diff_lines(text)
    assert diff[0] == "diff vs 000_input: 1 added, 1 removed, 2 changed shape"
    assert [line.split()[:2] for line in diff[1:]] == [["-", "bn1"], ["+", "tanh"], ["~", "conv1"], ["~", "relu"]]
    assert diff[1].split()[-1] == "1x8x16x16"
    assert diff[2].split()[-1] == "1x8x16x16"
    assert diff[3].endswith("1x8x16x16 -> 1x4x16x16")
    assert diff[4].endswith("1x8x16x16 -> 1x4x16x16")


def test_same_name_with_other_target_is_removed_and_added():
    # nn.Sequential names nodes by index: dropping layer 1 makes "_1" a different op, not a reshape.
    before = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU())
    after = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    gm0, gm1 = fx.symbolic_trace(before), fx.symbolic_trace(after)
    first = format_ir(gm0, annotate(gm0, (x,)), "000_input")
    second = format_ir(gm1, annotate(gm1, (x,)), "001_drop", previous=first)
    diff = diff_lines(second)
    assert diff[0] == "diff vs 000_input: 1 added, 2 removed, 0 changed shape"
    assert [line.split()[:2] for line in diff[1:]] == [["-", "_1"], ["-", "_2"], ["+", "_1"]]


def test_unchanged_graph_reports_no_changes():
    gm, cost = traced(Before())
    first = format_ir(gm, cost, "000_input")
    second = format_ir(gm, cost, "001_fold_bn", previous=first)
    assert diff_lines(second) == ["diff vs 000_input: 0 added, 0 removed, 0 changed shape", "(no changes)"]


def test_round_trip_with_tuple_shapes_and_spaces():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            out, weights = self.mha(x, x, x)
            return out + weights.sum()

    gm = fx.symbolic_trace(Attn())
    cost = annotate(gm, (torch.randn(2, 5, 16),))
    dump = parse_ir(format_ir(gm, cost, "000_input"))
    assert dump.rows == rows_of(gm, cost)
    mha = next(r for r in dump.rows if r.name == "mha")
    assert (mha.target, mha.shape, mha.macs) == ("mha (MultiheadAttention)", "(2x5x16, 2x5x5)", 11_840)


def test_parse_rejects_non_dump():
    with pytest.raises(ValueError, match="not an fxslim IR dump"):
        parse_ir("hello\nworld\n")


def test_unreadable_previous_dump_is_noted_not_fatal(tmp_path):
    gm, cost = traced(Before())
    broken = tmp_path / "000_input.txt"
    broken.write_text("# 000_input\nparams: 1\n")
    text = dump_ir(gm, cost, tmp_path / "001_x.txt", "001_x", previous_path=broken).read_text()
    assert text.splitlines()[-1] == "(previous dump unreadable, no diff: not an fxslim IR dump: no node table found)"
