"""finetune: on two separable Gaussian blobs a small MLP must go from chance to > 0.9 accuracy; distillation,
schedulers and early stopping must do what their options say; runs are reproducible and leave inputs alone."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from fxslim.errors import PassError, RecipeError
from fxslim.pass_api import PassContext
from fxslim.passes import finetune


def blobs(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 8-D with means +-0.8 per dim and unit noise: Bayes accuracy ~0.99."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + (y[:, None] * 2 - 1) * 0.8
    return x, y


def batches(n: int = 256, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = blobs(n, seed)
    return list(zip(x.split(size), y.split(size), strict=True))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def chance_model() -> fx.GraphModule:
    """A zero head predicts class 0 everywhere: exactly 0.5 accuracy on balanced data."""
    torch.manual_seed(0)
    model = MLP()
    nn.init.zeros_(model.fc2.weight)
    nn.init.zeros_(model.fc2.bias)
    return fx.symbolic_trace(model).eval()


def accuracy(model: nn.Module, seed: int = 1) -> float:
    x, y = blobs(1000, seed)  # a fresh sample: generalisation, not memorisation
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def ctx_for(data, reference: fx.GraphModule | None = None, seed: int = 0) -> PassContext:
    return PassContext(example_inputs=(torch.zeros(2, 8),), data=data, seed=seed, reference=reference)


def test_accuracy_goes_from_chance_to_above_09() -> None:
    gm = chance_model()
    assert accuracy(gm) == 0.5
    res = finetune.run(gm, ctx_for(batches()), epochs=3, lr=1e-2)
    assert res.changed and not res.module.training
    assert accuracy(res.module) > 0.9
    rec = res.record
    assert rec["epochs"] == 3 and rec["steps"] == 3 * 8 and rec["stopped_early"] is False
    assert rec["best_val_acc"] is None
    assert rec["final_train_loss"] < 0.3 < 0.69  # ln 2 at chance
    assert rec["final_train_acc"] > 0.9


@pytest.mark.parametrize(
    "optimizer, scheduler, lr",
    [("sgd", None, 0.05), ("adam", "step", 1e-2), ("adam", "cosine", 1e-2), ("sgd", "plateau", 0.05)],
)
def test_optimizers_and_schedulers_train(optimizer: str, scheduler: str | None, lr: float) -> None:
    res = finetune.run(
        chance_model(),
        ctx_for(batches()),
        epochs=3,
        lr=lr,
        optimizer=optimizer,
        scheduler=scheduler,
        step_size=1,
    )
    assert accuracy(res.module) > 0.9
    # only the plateau scheduler needs held-out batches: 10% of 8 -> at least 1 batch out, 7 trained per epoch
    assert res.record["steps"] == 3 * (7 if scheduler == "plateau" else 8)
    assert (res.record["best_val_acc"] is not None) == (scheduler == "plateau")


def test_distillation_runs_changes_weights_and_leaves_teacher_alone() -> None:
    teacher = finetune.run(chance_model(), ctx_for(batches()), epochs=3, lr=1e-2).module
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # the pass must not switch the caller's reference to eval

    plain = finetune.run(chance_model(), ctx_for(batches(), teacher), epochs=2, lr=1e-2)
    kd = finetune.run(chance_model(), ctx_for(batches(), teacher), epochs=2, lr=1e-2, kd_temperature=4.0)

    assert kd.changed and accuracy(kd.module) > 0.9
    assert not torch.equal(kd.module.fc1.weight, chance_model().fc1.weight)
    assert not torch.equal(kd.module.fc1.weight, plain.module.fc1.weight)  # the KD term changed the updates
    assert teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k


def test_pure_distillation_learns_from_unlabelled_batches() -> None:
    teacher = finetune.run(chance_model(), ctx_for(batches()), epochs=3, lr=1e-2).module
    unlabelled = [x for x, _ in batches()]
    res = finetune.run(chance_model(), ctx_for(unlabelled, teacher), epochs=3, lr=1e-2, kd_temperature=2.0)
    assert accuracy(res.module) > 0.9
    assert res.record["final_train_acc"] is None  # no labels, no accuracy


def test_early_stopping_stops_a_model_that_cannot_improve() -> None:
    gm = chance_model()
    res = finetune.run(gm, ctx_for(batches()), epochs=20, lr=0.0, patience=2)
    # epoch 1 sets the best score; epochs 2 and 3 do not beat it -> stop after 3 of 20
    assert res.record["epochs"] == 3 and res.record["stopped_early"] is True
    assert res.record["best_val_acc"] == 0.5
    for k, v in gm.state_dict().items():
        assert torch.equal(res.module.state_dict()[k], v), k


def test_early_stopping_keeps_the_best_validation_weights() -> None:
    """Train well, then train on flipped labels (the held-out last batch keeps the true ones): the model gets
    worse every epoch after the first, and the weights returned are the first epoch's, not the last's."""
    data = batches()
    good = finetune.run(chance_model(), ctx_for(data), epochs=2, lr=2e-2).module
    flipped = [(x, 1 - y) for x, y in data[:-1]] + data[-1:]
    options = {"epochs": 4, "lr": 3e-3, "optimizer": "sgd"}
    kept = finetune.run(good, ctx_for(flipped), patience=3, **options)
    last = finetune.run(good, ctx_for(flipped), **options)
    assert kept.record["best_val_acc"] > 0.9
    assert accuracy(kept.module) > 0.9
    assert accuracy(last.module) < 0.5  # what the last epoch's weights would have given


def test_same_seed_same_result_and_global_rng_untouched() -> None:
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)  # shuffles with the seeded RNG
    gm = chance_model()

    def train(seed: int) -> dict[str, torch.Tensor]:
        return finetune.run(gm, ctx_for(loader, seed=seed), epochs=2, lr=1e-2).module.state_dict()

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a, b, c = train(0), train(0), train(1)
    assert torch.equal(torch.get_rng_state(), rng)  # the pass seeds a forked RNG, not the caller's
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_input_module_is_not_mutated() -> None:
    gm = chance_model()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    res = finetune.run(gm, ctx_for(batches()), epochs=1, lr=1e-2)
    assert res.module is not gm
    assert gm.code == code and not gm.training
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_max_batches_per_epoch_caps_the_steps() -> None:
    res = finetune.run(chance_model(), ctx_for(batches()), epochs=2, max_batches_per_epoch=3)
    assert res.record["steps"] == 6


def test_missing_data_or_teacher_raise_pass_errors() -> None:
    with pytest.raises(PassError, match="finetune"):
        finetune.run(chance_model(), PassContext(example_inputs=()))
    with pytest.raises(PassError, match="reference"):
        finetune.run(chance_model(), ctx_for(batches()), kd_temperature=2.0)
    with pytest.raises(PassError, match="validation"):
        finetune.run(chance_model(), ctx_for(batches()[:1]), patience=1)
    with pytest.raises(PassError, match="targets"):
        finetune.run(chance_model(), ctx_for([x for x, _ in batches()]))


@pytest.mark.parametrize(
    "bad",
    [
        {"optimizer": "rmsprop"},
        {"scheduler": "linear"},
        {"epochs": -1},
        {"lr": -1.0},
        {"kd_alpha": 1.5},
        {"patience": 0},
        {"val_fraction": 1.0},
        {"max_batches_per_epoch": 0},
    ],
)
def test_bad_option_values_are_recipe_errors(bad: dict) -> None:
    with pytest.raises(RecipeError, match="finetune"):
        finetune.run(chance_model(), ctx_for(batches()), **bad)


def test_adaptive_skips_training_when_the_drop_is_small() -> None:
    good = finetune.run(chance_model(), ctx_for(batches()), epochs=3, lr=1e-2).module
    res = finetune.run(good, ctx_for(batches(), reference=good), epochs=3, lr=1e-2, adaptive=True)
    rec = res.record
    assert not res.changed and rec["trained"] is False and rec["steps"] == 0
    assert rec["drop_before"] == 0.0 and rec["acc_after"] == rec["acc_before"] > 0.9
    for k, v in good.state_dict().items():
        assert torch.equal(res.module.state_dict()[k], v), k


def test_adaptive_trains_when_the_drop_exceeds_min_drop() -> None:
    good = finetune.run(chance_model(), ctx_for(batches()), epochs=3, lr=1e-2).module
    options = {**finetune.PAPER_ADAPTIVE, "epochs": 4, "lr": 1e-2, "patience": 2}
    res = finetune.run(chance_model(), ctx_for(batches(), reference=good), **options)
    rec = res.record
    assert res.changed and rec["trained"] is True and rec["steps"] > 0
    assert rec["acc_before"] == 0.5 and rec["drop_before"] > 0.4  # chance vs a trained reference
    assert rec["acc_after"] > 0.9 and accuracy(res.module) > 0.9
    # a threshold above the drop skips training
    skipped = finetune.run(chance_model(), ctx_for(batches(), reference=good), adaptive=True, min_drop=0.6)
    assert skipped.record["trained"] is False and not skipped.changed


def test_adaptive_needs_a_reference_and_a_valid_threshold() -> None:
    with pytest.raises(PassError, match="adaptive"):
        finetune.run(chance_model(), ctx_for(batches()), adaptive=True)
    for bad in ({"min_drop": 1.0}, {"min_drop": -0.1}, {"adaptive": "yes"}):
        with pytest.raises(RecipeError, match="finetune"):
            finetune.run(chance_model(), ctx_for(batches(), reference=chance_model()), **bad)
