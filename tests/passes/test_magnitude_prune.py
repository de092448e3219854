"""magnitude_prune: exact counts. N:M leaves exactly N non-zeros in every group of M along the input dim;
unstructured pruning hits the requested sparsity to within one weight and removes the smallest magnitudes;
the input is never touched and the dense state travels in gm.meta for `asr`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxslim
from fxslim.dense_state import DENSE_META
from fxslim.errors import RecipeError
from fxslim.pass_api import PassContext
from fxslim.passes import magnitude_prune


class Net(nn.Module):
    """A 3-channel stem (not a multiple of 4: N:M must skip it), 8-wide convs, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.conv1d = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        h = torch.relu(self.conv(torch.relu(self.bn(self.stem(x)))))
        h = torch.relu(self.conv1d(h.flatten(2)))
        return self.fc(h.mean(2))


X = torch.randn(2, 3, 6, 6)


def traced(seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(Net().eval())


def ctx() -> PassContext:
    return PassContext(example_inputs=(X,))


def weights(gm) -> dict[str, torch.Tensor]:
    return {name: gm.get_submodule(name).weight.detach() for name in ("stem", "conv", "conv1d", "fc")}


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_leaves_exactly_n_nonzeros_in_every_group_along_the_input_dim(n, m) -> None:
    gm = traced()
    before = weights(gm)
    res = magnitude_prune.run(gm, ctx(), pattern=f"{n}:{m}")
    after = weights(res.module)

    assert res.record["skipped"] == {"stem": f"input width 3 is not a multiple of {m}"}
    torch.testing.assert_close(after["stem"], before["stem"], rtol=0, atol=0)
    for name in ("conv", "conv1d", "fc"):
        w, w0 = after[name], before[name]
        groups = w.movedim(1, -1).reshape(-1, m)
        groups0 = w0.movedim(1, -1).reshape(-1, m)
        assert ((groups != 0).sum(1) == n).all(), name
        # the kept ones are the N largest magnitudes of their group, unchanged
        kept_min = torch.where(groups != 0, groups0.abs(), torch.inf).min(1).values
        dropped_max = torch.where(groups == 0, groups0.abs(), -torch.inf).max(1).values
        assert (kept_min >= dropped_max).all(), name
        assert torch.equal(groups[groups != 0], groups0[groups != 0])
        assert res.record["layers"][name] == pytest.approx(1 - n / m)
    nonzero_total = sum(int((w != 0).sum()) for w in after.values())
    total = sum(w.numel() for w in after.values())
    assert res.record["zeros"] == total - nonzero_total
    assert res.record["sparsity"] == (total - nonzero_total) / total


@settings(max_examples=20, derandomize=True, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 3))
def test_global_sparsity_is_the_request_within_one_weight(sparsity, seed) -> None:
    gm = traced(seed)
    before = weights(gm)
    res = magnitude_prune.run(gm, ctx(), sparsity=sparsity, scope="global")
    after = weights(res.module)
    total = sum(w.numel() for w in after.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())

    assert abs(zeros - sparsity * total) <= 1
    assert res.record["zeros"] == zeros and res.record["weights"] == total
    assert res.record["sparsity"] == zeros / total
    # one global threshold: every kept magnitude is >= every pruned one, across layers
    kept = torch.cat([before[k][after[k] != 0].abs() for k in after])
    pruned = torch.cat([before[k][after[k] == 0].abs() for k in after])
    if len(kept) and len(pruned):
        assert kept.min() >= pruned.max()


def test_layer_scope_prunes_every_layer_to_the_request() -> None:
    res = magnitude_prune.run(traced(), ctx(), sparsity=0.7, scope="layer")
    for name, w in weights(res.module).items():
        assert abs(int((w == 0).sum()) - 0.7 * w.numel()) <= 0.5, name
        assert res.record["layers"][name] == pytest.approx(int((w == 0).sum()) / w.numel())


def test_global_scope_spreads_sparsity_unevenly_by_magnitude() -> None:
    gm = traced()
    with torch.no_grad():
        gm.fc.weight.mul_(100)  # the head's weights dwarf the rest: a global ranking keeps all of them
    res = magnitude_prune.run(gm, ctx(), sparsity=0.5)
    assert res.record["layers"]["fc"] == 0.0
    assert res.record["layers"]["conv"] > 0.5


def test_input_untouched_ignore_respected_and_dense_state_kept() -> None:
    gm = traced()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    res = magnitude_prune.run(gm, ctx(), sparsity=0.8, ignore=["fc"])
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert DENSE_META not in gm.meta
    assert res.changed and "fc" not in res.record["layers"]
    assert torch.equal(res.module.fc.weight, before["fc.weight"])
    dense = res.module.meta[DENSE_META]
    assert torch.equal(dense["conv.weight"], before["conv.weight"])
    # pruning again keeps the state of the truly dense model, not of the first pruning
    again = magnitude_prune.run(res.module, ctx(), sparsity=0.9)
    assert torch.equal(again.module.meta[DENSE_META]["conv.weight"], before["conv.weight"])
    assert again.record["sparsity"] > res.record["sparsity"]


def test_pruned_model_runs_in_a_recipe() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    res = fxslim.compress(model, X, [{"pass": "magnitude_prune", "pattern": "2:4"}])
    assert res.report[0].details["pattern"] == "2:4"
    assert res.module(X).shape == (2, 12)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "2-4"}, "pattern"),
        ({"scope": "net"}, "scope"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.7, "pattern": "2:4"}, "contradicts"),
    ],
)
def test_bad_options_are_recipe_errors(options, match) -> None:
    with pytest.raises(RecipeError, match=match):
        magnitude_prune.run(traced(), ctx(), **options)


def test_unknown_ignored_module_is_named() -> None:
    with pytest.raises(RecipeError, match=r"pass 'magnitude_prune': ignore names modules .* not have: \['nope'\]"):
        magnitude_prune.run(traced(), ctx(), ignore=["nope"])
