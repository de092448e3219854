"""bn_recalibrate: the re-estimated running statistics must equal the batch statistics computed by hand
(cumulative average of per-batch mean and unbiased variance), with dropout off and the input untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.errors import PassError, RecipeError
from fxslim.pass_api import PassContext
from fxslim.passes import bn_recalibrate

MU = torch.tensor([1.0, -2.0, 0.5, 3.0])
SIGMA = torch.tensor([0.5, 2.0, 1.0, 3.0])


class Net(nn.Module):
    """x -> BN -> Linear -> Dropout -> BN -> head. Dropout sits right before a BN so that it shows up."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.bn1 = nn.BatchNorm1d(6, momentum=0.3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn1(self.drop(self.fc(self.bn0(x))))))


def make_batches(n: int = 6, size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 4, generator=g) * SIGMA + MU, torch.randint(0, 2, (size,), generator=g)) for _ in range(n)
    ]


def traced_net() -> fx.GraphModule:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Net())
    gm.bn0.running_mean.fill_(7.0)  # stale statistics the pass must forget
    gm.bn1.running_var.fill_(9.0)
    return gm.eval()


def hand_stats(batches: list, fc: nn.Linear, eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """Cumulative average of per-batch statistics; bn0 normalises with the batch's own (biased) statistics."""
    m0, v0, m1, v1 = [], [], [], []
    with torch.no_grad():
        for x, _ in batches:
            m0.append(x.mean(0))
            v0.append(x.var(0, unbiased=True))
            h = fc((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + eps))  # bn0 has gamma=1, beta=0
            m1.append(h.mean(0))
            v1.append(h.var(0, unbiased=True))
    avg = lambda ts: torch.stack(ts).mean(0)  # noqa: E731
    return {"bn0_mean": avg(m0), "bn0_var": avg(v0), "bn1_mean": avg(m1), "bn1_var": avg(v1)}


def test_running_stats_match_hand_computed_batch_statistics() -> None:
    gm, batches = traced_net(), make_batches()
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(batches[0][0],), data=batches, seed=0))
    out = res.module
    want = hand_stats(batches, gm.fc)

    assert res.changed
    assert res.record == {"bn_layers": 2, "batches": 6, "momentum": None, "unused": []}
    torch.testing.assert_close(out.bn0.running_mean, want["bn0_mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.bn0.running_var, want["bn0_var"], atol=1e-4, rtol=1e-4)
    # The identical numbers would be impossible with dropout on: it rescales and zeroes fc's outputs.
    torch.testing.assert_close(out.bn1.running_mean, want["bn1_mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.bn1.running_var, want["bn1_var"], atol=1e-4, rtol=1e-4)
    # and the data's known distribution is what bn0 now believes (6 x 64 samples: loose bound)
    assert (out.bn0.running_mean - MU).abs().max() < 0.3
    assert (out.bn0.running_var.sqrt() / SIGMA - 1).abs().max() < 0.15


def test_momentum_option_gives_exponential_average_from_reset() -> None:
    gm, batches = traced_net(), make_batches(n=3)
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=batches), momentum=0.25)
    mean, var = torch.zeros(4), torch.ones(4)  # reset_running_stats
    for x, _ in batches:
        mean = 0.75 * mean + 0.25 * x.mean(0)
        var = 0.75 * var + 0.25 * x.var(0, unbiased=True)
    torch.testing.assert_close(res.module.bn0.running_mean, mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.module.bn0.running_var, var, atol=1e-4, rtol=1e-4)
    assert res.record["momentum"] == 0.25


def test_modes_and_momentum_are_restored() -> None:
    gm = traced_net()
    gm.drop.train()  # an odd mix of modes must come back exactly as given
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=make_batches(n=2)))
    assert {n: m.training for n, m in res.module.named_modules()} == {n: m.training for n, m in gm.named_modules()}
    assert res.module.bn0.momentum == 0.1 and res.module.bn1.momentum == 0.3


def test_batches_caps_the_calibration_and_tensor_batches_work() -> None:
    batches = [x for x, _ in make_batches(n=10)]  # tensors only, no targets
    res = bn_recalibrate.run(traced_net(), PassContext(example_inputs=(), data=batches), calib_batches=3)
    assert res.record["batches"] == 3
    assert int(res.module.bn0.num_batches_tracked) == 3
    torch.testing.assert_close(res.module.bn0.running_mean, torch.stack([x.mean(0) for x in batches[:3]]).mean(0))


def test_conv_bn2d_statistics_per_channel() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 5, 5, generator=g) * 2 + 1 for _ in range(4)]
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=batches))
    want_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    want_var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(res.module.get_submodule("0").running_mean, want_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.module.get_submodule("0").running_var, want_var, atol=1e-4, rtol=1e-4)


def test_input_module_is_not_mutated() -> None:
    gm = traced_net()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code, modes = gm.code, {n: m.training for n, m in gm.named_modules()}
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=make_batches()))
    assert res.module is not gm
    assert gm.code == code and {n: m.training for n, m in gm.named_modules()} == modes
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert gm.bn0.momentum == 0.1


def test_missing_data_raises_pass_error_naming_the_pass() -> None:
    with pytest.raises(PassError, match="bn_recalibrate"):
        bn_recalibrate.run(traced_net(), PassContext(example_inputs=(torch.randn(2, 4),)))


def test_empty_data_raises_pass_error() -> None:
    with pytest.raises(PassError, match="no batches"):
        bn_recalibrate.run(traced_net(), PassContext(example_inputs=(), data=[]))


def test_model_without_bn_is_unchanged() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    res = bn_recalibrate.run(gm, PassContext(example_inputs=()))  # no data needed when there is nothing to do
    assert not res.changed and res.record["bn_layers"] == 0
    x = torch.randn(2, 4)
    torch.testing.assert_close(res.module(x), gm(x))


def test_bn_the_data_never_reaches_keeps_its_statistics() -> None:
    gm = traced_net()
    spare = nn.BatchNorm1d(4)
    spare.running_mean.fill_(5.0)
    gm.add_submodule("spare", spare)  # registered, but no node calls it
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=make_batches(n=2)))
    assert res.record["unused"] == ["spare"] and res.record["bn_layers"] == 2
    torch.testing.assert_close(res.module.spare.running_mean, torch.full((4,), 5.0))


@pytest.mark.parametrize("bad", [{"calib_batches": 0}, {"calib_batches": 2.5}, {"momentum": 0.0}, {"momentum": 1.5}])
def test_bad_option_values_are_recipe_errors(bad: dict) -> None:
    with pytest.raises(RecipeError, match="bn_recalibrate"):
        bn_recalibrate.run(traced_net(), PassContext(example_inputs=(), data=make_batches(n=1)), **bad)


def test_recalibrated_model_still_runs_in_eval_with_new_statistics() -> None:
    gm, batches = traced_net(), make_batches()
    res = bn_recalibrate.run(gm, PassContext(example_inputs=(), data=batches))
    x = batches[0][0]
    normalised = F.batch_norm(x, res.module.bn0.running_mean, res.module.bn0.running_var, eps=1e-5)
    with torch.no_grad():
        assert normalised.mean(0).abs().max() < 0.5  # the stale mean 7.0 would give about -7 here
        assert not torch.equal(res.module(x), gm(x))
