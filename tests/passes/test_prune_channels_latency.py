"""prune_channels `round_to` and `objective="latency"`: rounded kept counts are exact multiples of the
group's unit (never below one unit, a group smaller than one unit stays whole, attention heads round by
head count); the latency objective measures each layer once (a second run only reads the table), keeps
shapes, shrinks groups as wholes, respects `ignore`, reaches its estimated target, and its greedy pays
for latency where it costs least importance; bad options are RecipeErrors naming the pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxslim
from fxslim import latency_plan
from fxslim.channel_counts import channel_units
from fxslim.errors import RecipeError
from fxslim.graph.deps import analyze
from fxslim.pass_api import PassContext
from fxslim.passes import prune_channels
from fxslim.zoo.randnet import BLOCKS, RandomNet, Spec, randomize_bn


class Mixed(nn.Module):
    """A depthwise-heavy inverted residual (16 -> 96 -> depthwise 5x5 -> 16, residual) and a dense part
    (3x3 convs 16 -> 40 -> 24), then a linear head: groups of 16, 96, 40, 24 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 96, 1)
        self.dw = nn.Conv2d(96, 96, 5, padding=2, groups=96)
        self.project = nn.Conv2d(96, 16, 1)
        self.dense1 = nn.Conv2d(16, 40, 3, padding=1)
        self.dense2 = nn.Conv2d(40, 24, 3, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        x = torch.relu(self.dense2(torch.relu(self.dense1(x))))
        return self.head(x.mean((2, 3)))


X = torch.randn(1, 3, 16, 16)
WIDTH = {"stem": "out_channels", "expand": "out_channels", "dense1": "out_channels", "dense2": "out_channels"}


def mixed() -> fx.GraphModule:
    torch.manual_seed(0)
    return fxslim.trace(Mixed().eval())


def prune(gm, **options):
    return prune_channels.run(gm, PassContext(example_inputs=(X,)), **options)


def widths(gm) -> dict[str, int]:
    return {name: getattr(gm.get_submodule(name), attr) for name, attr in WIDTH.items()}


# ---- round_to ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,round_to", [(0.5, 8), (0.3, 8), (0.7, 4), (0.5, 16)])
def test_round_to_keeps_nearest_multiple_exactly(ratio, round_to):
    gm = mixed()
    res = prune(gm, ratio=ratio, round_to=round_to)
    for g in res.record["per_group"]:
        size, plain = g["size"], g["size"] - math.floor(ratio * g["size"])
        if size < round_to:  # smaller than one unit: whole
            want = size
        else:
            want = min(max(math.floor(plain / round_to + 0.5) * round_to, round_to), size // round_to * round_to)
        assert g["kept"] == want, g
    assert res.module(X).shape == (1, 10)
    w = widths(res.module)
    assert all(v % round_to == 0 or v == widths(gm)[k] for k, v in w.items()), w


class Attention(nn.Module):
    """A 48-wide residual stream through 6-head attention (head_dim 8), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 48)
        self.attn = nn.MultiheadAttention(48, 6, batch_first=True)
        self.out = nn.Linear(48, 10)

    def forward(self, x):
        h = self.proj(x)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_round_to_by_head_count_for_attention():
    """An attention head spans head_dim (8) columns: round_to=8 needs no rounding of the head count."""
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(1, 5, 12)
    res = prune_channels.run(fxslim.trace(model), PassContext(example_inputs=(x,)), ratio=0.5, round_to=8)
    kept = sorted((g["size"], g["kept"]) for g in res.record["per_group"])
    assert kept == [(6, 3), (48, 24)]  # 3 heads x 8 = 24 columns: already a multiple of 8
    assert res.module(x).shape == model(x).shape


def test_round_to_one_is_the_plain_path():
    gm = mixed()
    a, b = prune(gm, ratio=0.4), prune(gm, ratio=0.4, round_to=1)
    assert a.record["per_group"] == b.record["per_group"]
    torch.testing.assert_close(a.module(X), b.module(X), rtol=0, atol=0)


def test_round_to_with_global_ranking():
    gm = mixed()
    res = prune(gm, ratio=0.5, round_to=8, global_ranking=True)
    assert all(g["kept"] % 8 == 0 and g["kept"] >= 8 for g in res.record["per_group"] if g["removed"])
    assert res.module(X).shape == (1, 10)


specs = st.builds(
    Spec,
    dims=st.just(2),
    in_ch=st.just(3),
    size=st.just(8),
    stem=st.sampled_from((8, 12, 16)),
    blocks=st.lists(st.tuples(st.sampled_from(BLOCKS), st.sampled_from((8, 12, 20))), min_size=1, max_size=3).map(
        tuple
    ),
    head=st.just("linear"),
)


@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, ratio=st.floats(0.2, 0.7), round_to=st.sampled_from((2, 4, 8)))
def test_round_to_property(spec, ratio, round_to):
    torch.manual_seed(0)
    model = randomize_bn(RandomNet(spec), 0).eval()
    x = spec.example_input()
    gm = fxslim.trace(model)
    res = prune_channels.run(gm, PassContext(example_inputs=(x,)), ratio=ratio, round_to=round_to)
    assert res.module(x).shape == model(x).shape
    dg = analyze(gm, (x,))
    units = channel_units(dg, dg.prunable_groups, round_to)  # round_to, or less where a channel
    assert all(round_to % u == 0 for u in units)  # spans several weight rows (shuffle pairs, heads)
    for g, u in zip(res.record.get("per_group", []), units, strict=True):
        assert g["kept"] == g["size"] or (g["kept"] % u == 0 and g["kept"] >= u), (g, u)


# ---- objective="latency" ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One measured run (every layer timed at three widths, no rounding) and a second run on the same table."""
    table = str(tmp_path_factory.mktemp("latency") / "table.json")
    gm = mixed()
    first = prune(gm, ratio=0.5, objective="latency", latency_table=table, round_to=1)
    second = prune(gm, ratio=0.5, objective="latency", latency_table=table, round_to=1)
    return gm, table, first, second


def test_latency_measures_once_then_reads_the_cache(measured):
    _, _, first, second = measured
    lat1, lat2 = first.record["latency"], second.record["latency"]
    assert lat1["layers"] == 7  # stem, expand, dw, project, dense1, dense2 and the head's input columns
    # one memory-bound op: the mean; every relu follows a conv and the residual add takes one (both fused)
    assert lat1["ops"] == 1 and [f["kind"] for f in lat1["fits"][7:]] == ["mean"]
    assert lat1["measured"] == 3 * lat1["layers"] + lat1["ops"] and lat1["lookups"] == 0
    assert lat2["measured"] == 0 and lat2["lookups"] == 3 * lat2["layers"] + lat2["ops"]
    assert lat1["kept"] == lat2["kept"]


def test_latency_reaches_its_target_and_keeps_shapes(measured):
    gm, _, first, _ = measured
    lat = first.record["latency"]
    assert lat["estimated_s"] <= lat["target_s"] < lat["estimated_full_s"]
    assert lat["table_full_s"] > 0
    assert first.changed and first.module(X).shape == (1, 10)
    assert gm.get_submodule("expand").out_channels == 96  # the input is never edited


def test_latency_shrinks_groups_as_wholes(measured):
    _, _, first, _ = measured
    m = first.module
    kept = {g["size"]: g["kept"] for g in first.record["per_group"]}
    assert first.record["latency"]["kept"] == {
        i: g["kept"] for i, g in zip(_prunable_indices(), first.record["per_group"], strict=True)
    }
    # the residual stream (16): stem out = project out = dense1 in; the hidden group (96): expand/dw/project
    assert m.stem.out_channels == m.project.out_channels == m.expand.in_channels == m.dense1.in_channels == kept[16]
    assert m.expand.out_channels == m.dw.out_channels == m.dw.groups == m.project.in_channels == kept[96]
    assert m.dense1.out_channels == m.dense2.in_channels == kept[40]
    assert m.dense2.out_channels == m.head.in_features == kept[24]
    for size, k in kept.items():
        assert math.ceil(size * (1 - 0.75)) <= k <= size  # never past max_ratio = (1 + 0.5) / 2


def _prunable_indices() -> list[int]:
    return [g.index for g in analyze(mixed(), (X,)).prunable_groups]


def test_latency_respects_ignore_and_round_to(measured):
    _, table, _, _ = measured
    res = prune(mixed(), ratio=0.5, objective="latency", latency_table=table, ignore=["dense1"], round_to=8)
    default = prune(mixed(), ratio=0.5, objective="latency", latency_table=table, ignore=["dense1"])
    assert default.record["per_group"] == res.record["per_group"]  # round_to defaults to 8 for latency
    m = res.module
    assert m.dense1.out_channels == 40 and m.dense1.in_channels == 16  # frozen in and out
    assert m.stem.out_channels == 16
    lat = res.record["latency"]
    assert lat["estimated_s"] <= lat["target_s"] + 1e-12 or lat["steps"] > 0
    for g in res.record["per_group"]:
        assert g["kept"] == g["size"] or g["kept"] % 8 == 0, g
    assert m(X).shape == (1, 10)


@pytest.fixture
def timed_widths(monkeypatch, tmp_path):
    """widths(gm, x, round_to) -> the (kind, in, out, groups) of every layer objective="latency" times (a fake
    timer: nothing runs), with round_to left to its default when None."""
    timed = set()

    def fake(module, shape, **kwargs):
        layer = module.attention if hasattr(module, "attention") else module
        if isinstance(layer, nn.Conv2d):
            timed.add(("conv", layer.in_channels, layer.out_channels, layer.groups))
        else:
            timed.add(("linear", layer.in_features, layer.out_features, 1))
        return 1e-3 * math.prod(shape[1:2]) * getattr(layer, "out_channels", 1)

    monkeypatch.setattr(latency_plan, "module_latency", fake)
    monkeypatch.setattr(latency_plan, "op_seconds", lambda gm, node, table: (1e-6, False))

    def widths(gm, x, round_to):
        timed.clear()
        options = {} if round_to is None else {"round_to": round_to}
        ctx = PassContext(example_inputs=(x,))
        prune_channels.run(gm, ctx, ratio=0.5, objective="latency", latency_table=str(tmp_path / "t.json"), **options)
        return set(timed)

    return widths


def test_latency_times_rounded_widths_with_round_to(timed_widths):
    """With round_to=8 every layer is timed at the widths the plan can have: each group keeping 0.5 and 0.25
    of its channels, rounded to a multiple of 8 (halves up, at least 8); without it, as scaled."""
    # (in, out, groups) at scales 1, 0.5, 0.25; groups of 16 (stem out = project out), 96, 40 and 24
    common = {("conv", 3, 16, 1), ("conv", 16, 96, 1), ("conv", 96, 96, 96), ("conv", 96, 16, 1)}
    common |= {("conv", 16, 40, 1), ("conv", 40, 24, 1), ("linear", 24, 10, 1)}
    common |= {("conv", 3, 8, 1), ("conv", 8, 48, 1), ("conv", 48, 48, 48), ("conv", 24, 24, 24), ("conv", 48, 8, 1)}
    rounded = {("conv", 8, 24, 1), ("conv", 24, 8, 1), ("conv", 8, 8, 1), ("conv", 24, 16, 1)}
    rounded |= {("linear", 16, 10, 1), ("linear", 8, 10, 1)}
    assert timed_widths(mixed(), X, 8) == common | rounded  # dense1 at 0.5: 8 in (16 / 2), 24 out (20 rounded)
    assert timed_widths(mixed(), X, None) == common | rounded  # the default with objective="latency"
    plain = {("conv", 8, 20, 1), ("conv", 4, 10, 1), ("conv", 20, 12, 1), ("conv", 10, 6, 1), ("conv", 3, 4, 1)}
    plain |= {("conv", 4, 24, 1), ("conv", 24, 4, 1), ("linear", 12, 10, 1), ("linear", 6, 10, 1)}
    assert timed_widths(mixed(), X, 1) == common | plain


class SmallFlat(nn.Module):
    """A group of 6 channels (less than one unit of 8) and a group of 16 whose channels span 16 positions
    each of the linear's input (flatten of 4x4 maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_latency_times_groups_as_the_plan_keeps_them(timed_widths):
    """Widths come from each group's kept count: a group smaller than one unit is timed whole (the plan never
    shrinks it), and the linear after the flatten at whole channels (16 positions each)."""
    torch.manual_seed(0)
    gm, x = fxslim.trace(SmallFlat().eval()), torch.randn(1, 3, 4, 4)
    rounded = {("conv", 3, 6, 1), ("conv", 6, 16, 1), ("conv", 6, 8, 1), ("linear", 256, 10, 1), ("linear", 128, 10, 1)}
    assert timed_widths(gm, x, 8) == rounded  # the 16-group keeps 8 at 0.5 and 0.25 (4 rounds up to 8)
    plain = {("conv", 3, 6, 1), ("conv", 3, 3, 1), ("conv", 3, 2, 1), ("conv", 6, 16, 1), ("conv", 3, 8, 1)}
    plain |= {("conv", 2, 4, 1), ("linear", 256, 10, 1), ("linear", 128, 10, 1), ("linear", 64, 10, 1)}
    assert timed_widths(gm, x, 1) == plain


def test_latency_target_is_the_rounded_uniform_cut():
    """With round_to the target is the estimate at the widths objective="macs" keeps with the same rounding."""
    gm = mixed()
    dg = analyze(gm, (X,))
    groups = dg.prunable_groups
    layers = [latency_plan.Layer(str(i), "Conv2d", 0.0, 1.0, macs=1000) for i in range(len(groups))]
    n0 = np.eye(len(groups))
    model = latency_plan.LatencyModel(
        layers, n0, np.zeros_like(n0), np.zeros(len(groups)), np.ones(len(groups)), 0, 0, 1.0
    )
    units = channel_units(dg, groups, 8)
    _, record = latency_plan.choose_widths(
        groups, scores=np.ones(int(dg.label.max()) + 1), model=model, ratio=0.5, units=units, max_ratio=0.75
    )
    macs = prune(mixed(), ratio=0.5, round_to=8).record["per_group"]
    assert record["latency"]["target_s"] == pytest.approx(sum(g["kept"] / g["size"] for g in macs))


def test_latency_greedy_pays_where_seconds_are_cheapest():
    """Two groups of equal importance and equal MACs; layer a (group 0) costs 10x more seconds per MAC:
    group 0 shrinks first and group 1 is left whole when that alone reaches the target."""
    gm = mixed()
    dg = analyze(gm, (X,))
    groups = dg.prunable_groups[:2]
    scores = np.ones(int(dg.label.max()) + 1)
    n0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    layers = [
        latency_plan.Layer("a", "Conv2d", 0.0, 10.0, macs=1000),
        latency_plan.Layer("b", "Conv2d", 0.0, 1.0, macs=1000),
    ]
    model = latency_plan.LatencyModel(layers, n0, np.zeros((2, 2)), np.zeros(2), np.ones(2), 0, 0, 11.0)
    kept, record = latency_plan.choose_widths(groups, scores, model, 0.25, np.ones(2, dtype=np.int64), 0.75)
    lat = record["latency"]
    assert lat["estimated_s"] <= lat["target_s"]
    assert lat["target_s"] == pytest.approx(
        10 * (1 - math.floor(0.25 * groups[0].size) / groups[0].size)
        + 1 * (1 - math.floor(0.25 * groups[1].size) / groups[1].size)
    )
    assert kept[1] == groups[1].size and kept[0] < groups[0].size


@pytest.mark.parametrize("faster", ["latency", "uniform"])
def test_latency_check_keeps_the_faster_whole_model(measured, monkeypatch, faster):
    """latency_check times both whole pruned models; with onnxruntime's verdict fixed, the pass returns
    exactly the latency objective's widths or exactly objective="macs"'s."""
    gm, table, first, _ = measured
    import fxslim.export

    def fake(paths, inputs, **kwargs):
        assert set(paths) == {"latency", "uniform"} and all(p.exists() for p in paths.values())
        return {name: (1.0 if name == faster else 2.0) for name in paths}

    monkeypatch.setattr(fxslim.export, "ort_latency", fake)
    res = prune(gm, ratio=0.5, objective="latency", latency_table=table, latency_check=True, round_to=1)
    check = res.record["latency"]["check"]
    assert check == {
        "kept": faster,
        "latency_s": 1.0 if faster == "latency" else 2.0,
        "uniform_s": 1.0 if faster == "uniform" else 2.0,
    }
    want = first if faster == "latency" else prune(gm, ratio=0.5)
    assert widths(res.module) == widths(want.module)
    torch.testing.assert_close(res.module(X), want.module(X), rtol=0, atol=0)


def test_latency_check_with_real_timing(measured):
    gm, table, _, _ = measured
    res = prune(gm, ratio=0.5, objective="latency", latency_table=table, latency_check=True, round_to=1)
    check = res.record["latency"]["check"]
    assert check["kept"] in ("latency", "uniform") and check["latency_s"] > 0 and check["uniform_s"] > 0
    assert (check["kept"] == "latency") == (check["latency_s"] <= check["uniform_s"])
    assert res.module(X).shape == (1, 10)


# ---- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ({"round_to": 0}, "round_to"),
        ({"round_to": 2.5}, "round_to"),
        ({"round_to": True}, "round_to"),
        ({"objective": "flops"}, "objective"),
        ({"objective": "latency", "global_ranking": True}, "global_ranking"),
        ({"max_ratio": 0.8}, "max_ratio"),
        ({"objective": "latency", "max_ratio": 0.2}, "max_ratio"),
        ({"objective": "latency", "max_ratio": 1.0}, "max_ratio"),
        ({"objective": "latency", "latency_table": 3}, "latency_table"),
        ({"latency_check": True}, "latency_check"),
        ({"objective": "latency", "latency_check": 1}, "latency_check"),
    ],
)
def test_bad_options_are_recipe_errors(options, match):
    with pytest.raises(RecipeError, match=f"prune_channels.*{match}"):
        fxslim.compress(Mixed(), (X,), [{"pass": "prune_channels", "ratio": 0.5, **options}])
