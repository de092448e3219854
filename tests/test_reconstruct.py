"""Least-squares reconstruction after pruning (fxslim.reconstruct, equivariant_prune(reconstruct=True))."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
from fxslim.errors import PassError, RecipeError
from fxslim.graph.deps import analyze
from fxslim.reconstruct import reconstruct_
from fxslim.rewrite import ChannelPlan, apply_plan
from fxslim.zoo.randnet import randomize_bn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e2cnn 0.2.3 indexes with uint8 masks
    from fxslim.zoo.e2 import C4Net


class Chain(nn.Module):
    """conv → ReLU → conv (stride, padding, dilation) → ReLU → mean → linear, 1-D or 2-D."""

    def __init__(self, dims: int, mid: int = 6) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.c1 = conv(3, mid, 3, padding=1)
        self.c2 = conv(mid, 5, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.flatten(2).mean(2))


def _duplicate_channel(m: Chain, src: int, dst: int) -> None:
    """Make c1's output channel `dst` an exact copy of channel `src`."""
    with torch.no_grad():
        m.c1.weight[dst] = m.c1.weight[src]
        m.c1.bias[dst] = m.c1.bias[src]


def _batches(shape: tuple, n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), None) for _ in range(n)]


@pytest.mark.parametrize("dims", [1, 2])
def test_removing_a_duplicate_channel_is_reconstructed_exactly(dims):
    torch.manual_seed(dims)
    m = Chain(dims).eval()
    _duplicate_channel(m, src=1, dst=4)
    shape = (8, 3, 12) if dims == 1 else (8, 3, 10, 10)
    gm = fxslim.trace(m)
    dg = analyze(gm, (torch.randn(*shape),))
    plan = ChannelPlan(dg).remove(dg.group_of("c1", 1), [0, 1, 2, 3, 5])
    new = apply_plan(gm, plan)
    x = torch.randn(*shape)

    def c2_out(g):
        with torch.no_grad():
            return g.c2(torch.relu(g.c1(x)))

    assert (c2_out(new) - c2_out(gm)).abs().max() > 1e-2  # slicing alone loses channel 4's contribution
    records = reconstruct_(new, gm, plan, _batches(shape), ridge=0.0)
    assert [r["layer"] for r in records] == ["c2"]  # the only layer whose inputs changed
    assert records[0]["rel_error_before"] > 0.05 and records[0]["rel_error_after"] < 1e-6
    torch.testing.assert_close(c2_out(new), c2_out(gm), atol=1e-4, rtol=0)
    torch.testing.assert_close(new(x), gm(x), atol=1e-4, rtol=0)
    # c2's columns: channel 1 now carries what channels 1 and 4 did
    want = m.c2.weight[:, 1] + m.c2.weight[:, 4]
    torch.testing.assert_close(new.c2.weight[:, 1], want, atol=1e-4, rtol=0)


def test_removed_output_channels_select_the_targets_and_linear_layers_refit():
    """c2 loses output channels too: its re-fit targets the kept ones; fc (input reduced) is re-fit after."""
    torch.manual_seed(3)
    m = Chain(2).eval()
    _duplicate_channel(m, src=0, dst=5)
    shape = (8, 3, 10, 10)
    gm = fxslim.trace(m)
    dg = analyze(gm, (torch.randn(*shape),))
    plan = ChannelPlan(dg).remove(dg.group_of("c1", 1), [0, 1, 2, 3, 4]).remove(dg.group_of("c2", 1), [0, 2, 4])
    new = apply_plan(gm, plan)
    records = reconstruct_(new, gm, plan, _batches(shape, n=6), ridge=0.0, positions=64)
    assert [r["layer"] for r in records] == ["c2", "fc"]
    assert records[0]["rel_error_after"] < 1e-6  # c2's kept outputs are exact again
    assert records[1]["rel_error_after"] < records[1]["rel_error_before"]
    x = torch.randn(*shape)
    with torch.no_grad():
        kept = torch.relu(gm.c2(torch.relu(gm.c1(x))))[:, [0, 2, 4]]
        torch.testing.assert_close(torch.relu(new.c2(torch.relu(new.c1(x)))), kept, atol=1e-4, rtol=0)


def test_a_grouped_conv_losing_whole_groups_keeps_exact_outputs_and_the_next_layer_is_refit():
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(4, 12, 1)
            self.c2 = nn.Conv2d(12, 12, 3, padding=1, groups=3)
            self.c3 = nn.Conv2d(12, 3, 1)

        def forward(self, x):
            return self.c3(self.c2(self.c1(x)))

    torch.manual_seed(0)
    gm = fxslim.trace(Grouped().eval())
    shape = (4, 4, 6, 6)
    dg = analyze(gm, (torch.randn(*shape),))
    group = dg.group_of("c1", 1)  # one atom per conv group of c2
    plan = ChannelPlan(dg).remove(group, np.arange(group.size) != 0)
    new = apply_plan(gm, plan)
    records = reconstruct_(new, gm, plan, _batches(shape))
    assert [r["layer"] for r in records] == ["c3"]  # c2's kept groups read the same inputs as before
    assert records[0]["rel_error_after"] < records[0]["rel_error_before"]
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(new.c2(new.c1(x)), gm.c2(gm.c1(x))[:, 4:], atol=1e-5, rtol=0)


def test_a_merge_plan_is_not_refit():
    m = Chain(2).eval()
    gm = fxslim.trace(m)
    shape = (2, 3, 8, 8)
    dg = analyze(gm, (torch.randn(*shape),))
    plan = ChannelPlan(dg).merge(dg.group_of("c1", 1), [[0, 1]])
    new = apply_plan(gm, plan)
    before = new.c2.weight.clone()
    records = reconstruct_(new, gm, plan, _batches(shape))
    assert records == [{"layer": "c2", "skipped": "merged channels (not a plain selection)"}]
    assert torch.equal(new.c2.weight, before)


def _c4net() -> nn.Module:
    torch.manual_seed(0)
    model = C4Net(fields=(4, 6, 8), hidden=16)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))
    return randomize_bn(model, seed=1).eval()


def test_equivariant_prune_with_reconstruction_keeps_invariance_and_lowers_the_error():
    model = _c4net()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    x = torch.randn(2, 1, 28, 28, generator=g)
    step = {"pass": "equivariant_prune", "scope": "fields", "ratio": 0.5}
    plain = fxslim.compress(model, (x,), [step]).module
    res = fxslim.compress(model, (x,), [{**step, "reconstruct": True, "calib_batches": 2}], data=data)
    rep = res.report[0]
    assert rep.symmetry_error < 1e-4
    rec = rep.details["reconstructed"]
    assert [r["layer"] for r in rec] == ["features.3", "features.7", "head.0"]
    assert all(r["rel_error_after"] < r["rel_error_before"] for r in rec)
    assert all(r["samples"] == 2 * 4 * 8 * 16 for r in rec[:2])  # 2 batches x 4 rotations x 8 x 16 positions
    # same architecture as plain pruning; closer to the unpruned logits on fresh inputs
    assert [p.shape for p in res.module.parameters()] == [p.shape for p in plain.parameters()]
    z = torch.randn(16, 1, 28, 28, generator=g)
    with torch.no_grad():
        ref = model(z)
        assert (res.module(z) - ref).norm() < (plain(z) - ref).norm()


def test_reconstruction_needs_data_and_a_valid_batch_count():
    model, x = _c4net(), torch.randn(1, 1, 28, 28)
    step = {"pass": "equivariant_prune", "scope": "fields", "ratio": 0.5, "reconstruct": True}
    with pytest.raises(PassError, match="needs data"):
        fxslim.compress(model, (x,), [step])
    with pytest.raises(RecipeError, match="calib_batches"):
        fxslim.compress(model, (x,), [{**step, "calib_batches": 0}], data=[(x, None)])


def test_prune_channels_with_reconstruction_is_closer_to_the_unpruned_model():
    from fxslim.zoo import models as zoo

    torch.manual_seed(0)
    model = randomize_bn(zoo.build("resnet20", in_ch=1, num_classes=10), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 1, 16, 16, generator=g), None) for _ in range(4)]
    x = torch.randn(1, 1, 16, 16, generator=g)
    step = {"pass": "prune_channels", "ratio": 0.5}
    plain = fxslim.compress(model, (x,), [step]).module
    res = fxslim.compress(model, (x,), [{**step, "reconstruct": True, "calib_batches": 4}], data=data)
    rec = res.report[0].details["reconstructed"]
    refit = [r for r in rec if "skipped" not in r]
    assert refit and all(r["rel_error_after"] <= r["rel_error_before"] for r in refit)
    assert [p.shape for p in res.module.parameters()] == [p.shape for p in plain.parameters()]
    z = torch.randn(32, 1, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(z)
        assert (res.module(z) - ref).norm() < 0.9 * (plain(z) - ref).norm()
    with pytest.raises(PassError, match="needs data"):
        fxslim.compress(model, (x,), [{**step, "reconstruct": True}])


def test_the_input_model_is_never_changed():
    """The cut shares every untouched tensor (e.g. a bias whose outputs all stay) with the input model; the
    re-fit must not write through it."""
    torch.manual_seed(0)
    model = Chain(2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches((4, 3, 8, 8))
    step = {"pass": "prune_channels", "ratio": 0.5, "reconstruct": True}
    res = fxslim.compress(model, (data[0][0],), [step], data=data)
    assert any(r.get("layer") == "fc" and "skipped" not in r for r in res.report[0].details["reconstructed"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_builtin_prune50_ft_recipe_refits_then_finetunes():
    torch.manual_seed(0)
    model = Chain(2).eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    res = fxslim.compress(model, (data[0][0][:1],), "prune50_ft", data=data)
    assert [r.name for r in res.report] == ["prune_channels", "finetune", "fold_bn"]
    assert any("skipped" not in r for r in res.report[0].details["reconstructed"])
    assert res.module(data[0][0]).shape == (8, 4)
