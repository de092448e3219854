"""Pass `finetune`: train a copy of the rewritten model on `ctx.data` to win back the accuracy that
compression cost, with cross entropy on class-index targets, optionally distilled from the untouched
reference model (Hinton et al. 2015), optionally with a LR schedule and early stopping on held-out batches.
It is the only pass that changes weights by gradient descent; it never mutates the GraphModule it is given
or the reference, never changes the caller's global RNG state, and prints nothing but a tqdm bar (shown
only on a terminal)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from fxslim.errors import PassError, RecipeError
from fxslim.pass_api import PassContext, PassResult

from .bn_recalibrate import split_batch  # one reading of a batch for all passes that consume data

NAME = "finetune"

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULERS = (None, "step", "cosine", "plateau")


def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    scheduler: str | None = None,
    step_size: int = 10,
    gamma: float = 0.8,
    kd_temperature: float | None = None,
    kd_alpha: float = 0.5,
    patience: int | None = None,
    val_fraction: float = 0.1,
    max_batches_per_epoch: int | None = None,
) -> PassResult:
    """Train a copy of `gm` on `ctx.data` and return it in eval mode.

    epochs: passes over the training batches (an upper bound when `patience` is set).
    lr: learning rate.
    optimizer: "adam" or "sgd" (momentum 0.9, Nesterov).
    weight_decay: L2 penalty handed to the optimizer.
    scheduler: None, "step" (StepLR), "cosine" (cosine annealing over `epochs`) or "plateau"
        (ReduceLROnPlateau on the validation loss, factor 0.5, patience 10 epochs).
    step_size: epochs between LR decays of the "step" scheduler (10: the FCOS paper's setting).
    gamma: LR decay factor of the "step" scheduler (0.8: the FCOS paper's setting).
    kd_temperature: distil from `ctx.reference` at this temperature; None trains on the labels alone.
    kd_alpha: weight of the distillation term, loss = (1 - a) * CE + a * T^2 * KL(teacher_T || student_T).
    patience: stop after this many epochs without a better validation accuracy, keeping the best weights;
        None trains all `epochs`.
    val_fraction: fraction of the batches (the last ones, at least one) held out when `patience` or the
        "plateau" scheduler needs a validation score. Pass data in a fixed order (a list, or a DataLoader
        without shuffle) for the held-out batches to stay the same from epoch to epoch.
    max_batches_per_epoch: cap on the training batches per epoch; None uses them all.

    record: {"epochs": int, "steps": int, "final_train_loss": float | None, "final_train_acc": float | None,
    "best_val_acc": float | None, "stopped_early": bool}.
    """
    _check_options(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        scheduler=scheduler,
        step_size=step_size,
        gamma=gamma,
        kd_temperature=kd_temperature,
        kd_alpha=kd_alpha,
        patience=patience,
        val_fraction=val_fraction,
        max_batches_per_epoch=max_batches_per_epoch,
    )
    data = ctx.require_data(NAME)
    if kd_temperature is not None and ctx.reference is None:
        raise PassError(f"pass {NAME!r}: kd_temperature is set but ctx.reference (the teacher) is None")

    gm = copy.deepcopy(gm)
    home = next((t.device for t in itertools.chain(gm.parameters(), gm.buffers())), torch.device("cpu"))
    gm.to(ctx.device)
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params or epochs == 0:
        gm.eval().to(home)
        record = _record(0, 0, None, None, None, False)
        return PassResult(gm, changed=False, record=record)
    # A copy of the teacher: moving or switching the reference to eval would mutate the caller's model.
    teacher = copy.deepcopy(ctx.reference).to(ctx.device).eval() if kd_temperature is not None else None
    loss_fn = _Loss(teacher, kd_temperature, kd_alpha)
    needs_val = patience is not None or scheduler == "plateau"

    # fork_rng: seeding here must not change the random stream of whatever runs after the pass.
    cuda = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(ctx.seed)
        opt = _make_optimizer(params, optimizer, lr, weight_decay)
        sched = _make_scheduler(opt, scheduler, epochs, step_size, gamma)
        best_score, best_acc, best_state, bad_epochs = -math.inf, None, None, 0
        steps, train_loss, train_acc, stopped_early = 0, None, None, False
        bar = tqdm(range(epochs), desc="finetune", disable=None, leave=False)
        epoch = 0
        for epoch in bar:
            train, val = _split_epoch(data, needs_val, val_fraction, max_batches_per_epoch)
            train_loss, train_acc, n = _train_epoch(gm, train, loss_fn, opt, ctx.device)
            steps += n
            postfix: dict[str, Any] = {"loss": f"{train_loss:.4f}"}
            if train_acc is not None:
                postfix["acc"] = f"{train_acc:.3f}"
            val_loss = val_acc = None
            if needs_val:
                val_loss, val_acc = _evaluate(gm, val, loss_fn, ctx.device)
                if val_acc is not None:
                    postfix["val_acc"] = f"{val_acc:.3f}"
                    best_acc = val_acc if best_acc is None else max(best_acc, val_acc)
            bar.set_postfix(postfix)
            if scheduler == "plateau":
                sched.step(val_loss)
            elif sched is not None:
                sched.step()
            if patience is None:
                continue
            # Accuracy when targets are class indices; otherwise the lower validation loss wins.
            score = val_acc if val_acc is not None else -val_loss
            if score > best_score:
                best_score, bad_epochs = score, 0
                best_state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    stopped_early = epoch + 1 < epochs
                    break
        bar.close()
    if best_state is not None:
        gm.load_state_dict(best_state)
    gm.eval().to(home)
    record = _record(epoch + 1, steps, train_loss, train_acc, best_acc, stopped_early)
    ctx.debug("finetune: %s", record)
    return PassResult(gm, changed=steps > 0, record=record)


class _Loss:
    """Cross entropy on the labels, blended with the distillation term when a teacher is given.

    Hinton, Vinyals & Dean 2015, Sec. 2: L = (1 - a) CE(s, y) + a T^2 KL(softmax(t / T) || softmax(s / T)).
    """

    def __init__(self, teacher: nn.Module | None, temperature: float | None, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, logits: torch.Tensor, inputs: tuple, y: torch.Tensor | None) -> torch.Tensor:
        if self.teacher is None:
            if y is None:
                raise PassError(f"pass {NAME!r}: batches carry no targets; give (x, y) batches or set kd_temperature")
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            teacher_logits = _logits(self.teacher(*inputs))
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)  # T^2 keeps the soft-target gradients on the scale of the hard-target ones (Hinton, Sec. 2)
        if y is None:  # unlabelled data: pure distillation
            return kd
        return (1.0 - self.alpha) * F.cross_entropy(logits, y) + self.alpha * kd


def _train_epoch(
    gm: nn.Module, batches: list, loss_fn: _Loss, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[float, float | None, int]:
    """One pass over `batches`; returns (mean loss, accuracy or None, optimizer steps)."""
    gm.train()
    total_loss, correct, count, scored = 0.0, 0, 0, 0
    for batch in batches:
        inputs, y = _to_device(batch, device)
        logits = _logits(gm(*inputs))
        loss = loss_fn(logits, inputs, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = logits.shape[0]
        total_loss += float(loss.detach()) * n
        count += n
        if _is_class_index(y):
            correct += int((logits.detach().argmax(1) == y).sum())
            scored += y.numel()
    return total_loss / count, (correct / scored if scored else None), len(batches)


def _evaluate(gm: nn.Module, batches: list, loss_fn: _Loss, device: torch.device) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) of `gm` in eval mode on `batches`."""
    gm.eval()
    total_loss, correct, count, scored = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            inputs, y = _to_device(batch, device)
            logits = _logits(gm(*inputs))
            n = logits.shape[0]
            total_loss += float(loss_fn(logits, inputs, y)) * n
            count += n
            if _is_class_index(y):
                correct += int((logits.argmax(1) == y).sum())
                scored += y.numel()
    return total_loss / count, (correct / scored if scored else None)


def _split_epoch(data: Iterable, needs_val: bool, val_fraction: float, max_batches: int | None) -> tuple[list, list]:
    """This epoch's (training, held-out) batches: the data iterated once, the last batches held out."""
    if not needs_val:
        train = list(itertools.islice(data, max_batches) if max_batches is not None else data)
        val: list = []
    else:
        batches = list(data)
        n_val = max(1, int(len(batches) * val_fraction))
        if n_val >= len(batches):
            raise PassError(
                f"pass {NAME!r}: {len(batches)} batch(es) cannot be split into training and validation; "
                "give more batches, or drop patience / the plateau scheduler"
            )
        train, val = batches[:-n_val], batches[-n_val:]
        if max_batches is not None:
            train = train[:max_batches]
    if not train:
        raise PassError(
            f"pass {NAME!r}: ctx.data yielded no training batches (it must be re-iterable each epoch: "
            "a list or a DataLoader, not a generator)"
        )
    return train, val


def _to_device(batch: Any, device: torch.device) -> tuple[tuple, torch.Tensor | None]:
    inputs, y = split_batch(batch)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return inputs, (y.to(device) if isinstance(y, torch.Tensor) else y)


def _logits(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise PassError(f"pass {NAME!r}: the model must return a logits tensor, got {type(out).__name__}")
    return out


def _is_class_index(y: Any) -> bool:
    return isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex()


def _make_optimizer(params: list, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, name: str | None, epochs: int, step_size: int, gamma: float) -> Any:
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=10)
    return None


def _record(
    epochs: int, steps: int, loss: float | None, acc: float | None, best_val_acc: float | None, stopped: bool
) -> dict:
    return {
        "epochs": epochs,
        "steps": steps,
        "final_train_loss": loss,
        "final_train_acc": acc,
        "best_val_acc": best_val_acc,
        "stopped_early": stopped,
    }


def _check_options(
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    scheduler: str | None,
    step_size: int,
    gamma: float,
    kd_temperature: float | None,
    kd_alpha: float,
    patience: int | None,
    val_fraction: float,
    max_batches_per_epoch: int | None,
) -> None:
    """RecipeError naming the option and its valid values for the first bad one."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    problems = [
        (is_int(epochs) and epochs >= 0, f"epochs must be an integer >= 0, got {epochs!r}"),
        (is_num(lr) and lr >= 0, f"lr must be >= 0, got {lr!r}"),
        (optimizer in _OPTIMIZERS, f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}"),
        (is_num(weight_decay) and weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}"),
        (scheduler in _SCHEDULERS, f"scheduler must be one of {_SCHEDULERS}, got {scheduler!r}"),
        (is_int(step_size) and step_size >= 1, f"step_size must be an integer >= 1, got {step_size!r}"),
        (is_num(gamma) and 0 < gamma <= 1, f"gamma must be in (0, 1], got {gamma!r}"),
        (
            kd_temperature is None or (is_num(kd_temperature) and kd_temperature > 0),
            f"kd_temperature must be > 0, got {kd_temperature!r}",
        ),
        (is_num(kd_alpha) and 0 <= kd_alpha <= 1, f"kd_alpha must be in [0, 1], got {kd_alpha!r}"),
        (
            patience is None or (is_int(patience) and patience >= 1),
            f"patience must be None or >= 1, got {patience!r}",
        ),
        (
            is_num(val_fraction) and 0 < val_fraction < 1,
            f"val_fraction must be in (0, 1), got {val_fraction!r}",
        ),
        (
            max_batches_per_epoch is None or (is_int(max_batches_per_epoch) and max_batches_per_epoch >= 1),
            f"max_batches_per_epoch must be None or an integer >= 1, got {max_batches_per_epoch!r}",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise RecipeError(f"pass {NAME!r}: {message}")
