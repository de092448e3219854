"""equivariant_prune: the paper's Linear pruning keeps exactly floor(C_out·(1−p)) units, the highest-L2 ones,
with the next layer's columns sliced; field pruning removes whole fields; bad options are RecipeErrors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import fx, nn

import fxslim
from fxslim.errors import PassError, RecipeError
from fxslim.pass_api import PassContext
from fxslim.passes import equivariant_prune

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e2cnn 0.2.3 indexes with uint8 masks
    from fxslim.zoo.e2 import C4Net


def _mlp() -> fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    return fxslim.trace(model)


def _ctx(shape=(4, 6)) -> PassContext:
    return PassContext(example_inputs=(torch.randn(*shape),))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_linear_scope_keeps_floor_count_of_highest_l2_units(ratio: float):
    gm = _mlp()
    res = equivariant_prune.run(gm, _ctx(), ratio=ratio, scope="linear")
    cols = torch.arange(6)
    for name, nxt, c_out in (("0", "2", 10), ("2", "4", 7)):
        w_old = gm.get_submodule(name).weight.detach()
        keep_n = max(1, math.floor(c_out * (1 - ratio)))
        top = torch.argsort(w_old.norm(dim=1), descending=True)[:keep_n].sort().values
        new = res.module.get_submodule(name)
        assert new.out_features == keep_n
        torch.testing.assert_close(new.weight, w_old[top][:, cols], atol=0, rtol=0)
        cols = top
        torch.testing.assert_close(new.bias, gm.get_submodule(name).bias[top], atol=0, rtol=0)
        # the next layer's input columns follow the kept units
        assert res.module.get_submodule(nxt).in_features == keep_n
    assert res.module.get_submodule("4").out_features == 3  # logits are never pruned
    assert res.changed == (ratio > 0)
    assert res.record["removed_units"] == sum(c - max(1, math.floor(c * (1 - ratio))) for c in (10, 7))


def test_pruned_units_are_exactly_the_ones_that_do_not_matter():
    """Units with zero rows contribute nothing: pruning them leaves the outputs unchanged."""
    gm = _mlp()
    with torch.no_grad():
        gm.get_submodule("0").weight[[1, 4, 7]] = 0.0
        gm.get_submodule("0").bias[[1, 4, 7]] = 0.0
    x = torch.randn(5, 6)
    res = equivariant_prune.run(gm, _ctx(), ratio=0.3, scope="linear")  # floor(10·0.7) = 7 kept of layer 0
    assert res.module.get_submodule("0").out_features == 7
    assert res.module.get_submodule("2").out_features == 4  # floor(7·0.7) = 4 kept: not lossless there
    only_first = equivariant_prune.run(gm, _ctx(), ratio=0.3, scope="linear", ignore=["2"])
    torch.testing.assert_close(only_first.module(x), gm(x), atol=1e-6, rtol=0)


def test_field_scope_removes_whole_fields_by_filter_norm_and_leaves_input_alone():
    torch.manual_seed(0)
    model = C4Net(fields=(4, 6, 8), hidden=16).eval()
    x = torch.randn(2, 1, 28, 28)
    gm = fxslim.trace(model)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    res = equivariant_prune.run(gm, PassContext(example_inputs=(x,)), ratio=0.5, scope="fields")
    assert [(r["layer"], r["before"], r["after"]) for r in res.record["layers"]] == [
        ("features.0", 4, 2),
        ("features.3", 6, 3),
        ("features.7", 8, 4),
    ]
    w = gm.get_submodule("features.0").weight.detach()
    norms = w.reshape(4, 4, -1).pow(2).sum((1, 2))
    kept = torch.argsort(norms, descending=True)[:2].sort().values
    rows = torch.cat([torch.arange(4 * f, 4 * f + 4) for f in kept.tolist()])
    torch.testing.assert_close(res.module.get_submodule("features.0").weight, w[rows], atol=0, rtol=0)
    assert res.module.get_submodule("head.0").in_features == 4  # group pooling: one input per kept field
    assert [f.fields for f in res.module.meta["field_layout"]] == [2, 3, 4]
    assert gm.code == code and [f.fields for f in gm.meta["field_layout"]] == [4, 6, 8]
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fields_scope_needs_a_field_layout():
    with pytest.raises(PassError, match="field layout"):
        equivariant_prune.run(_mlp(), _ctx(), scope="fields")


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": True}, {"scope": "convs"}])
def test_bad_options_are_recipe_errors(bad):
    with pytest.raises(RecipeError, match="equivariant_prune"):
        equivariant_prune.run(_mlp(), _ctx(), **bad)
