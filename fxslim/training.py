"""The one training loop of fxslim: used by the `finetune` pass and by the zoo's training harness.

`fit` trains a model in place for a number of epochs with Adam or SGD, an optional LR schedule, optional
distillation from a teacher (Hinton et al. 2015) and optional early stopping on held-out batches (keeping
the best weights). Seeded under `torch.random.fork_rng`, so the caller's random stream is unchanged.
Progress is a tqdm bar (shown only on a terminal). This file never copies or replaces the model: callers
that must not mutate theirs pass a copy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fxslim.errors import PassError

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = (None, "step", "cosine", "plateau")


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """(model inputs, target or None) of one data batch: `(x, y)`, `[x, y]`, `x`, or `((x1, x2), y)`."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise PassError("an empty batch in the data")
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    return inputs, y


def fit(
    model: nn.Module,
    epoch_batches: Callable[[int], tuple[list, list]],
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    scheduler: str | None = None,
    step_size: int = 10,
    gamma: float = 0.8,
    teacher: nn.Module | None = None,
    kd_temperature: float | None = None,
    kd_alpha: float = 0.5,
    patience: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "train",
) -> dict:
    """Train `model` in place; `epoch_batches(epoch)` gives that epoch's (training, held-out) batch lists.

    Held-out batches are scored each epoch when given (needed by `patience` and the "plateau" scheduler).
    Returns {"epochs", "steps", "final_train_loss", "final_train_acc", "best_val_acc", "stopped_early"}."""
    device = torch.device(device)
    loss_fn = _Loss(teacher, kd_temperature, kd_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        opt = _make_optimizer(params, optimizer, lr, weight_decay)
        sched = _make_scheduler(opt, scheduler, epochs, step_size, gamma)
        best_score, best_acc, best_state, bad_epochs = -math.inf, None, None, 0
        steps, train_loss, train_acc, stopped_early = 0, None, None, False
        bar = tqdm(range(epochs), desc=desc, disable=None, leave=False)
        epoch = -1
        for epoch in bar:
            train, val = epoch_batches(epoch)
            train_loss, train_acc, n = _train_epoch(model, train, loss_fn, opt, device)
            steps += n
            postfix: dict[str, Any] = {"loss": f"{train_loss:.4f}"}
            if train_acc is not None:
                postfix["acc"] = f"{train_acc:.3f}"
            val_loss = val_acc = None
            if val:
                val_loss, val_acc = _evaluate(model, val, loss_fn, device)
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
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    stopped_early = epoch + 1 < epochs
                    break
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return _record(epoch + 1, steps, train_loss, train_acc, best_acc, stopped_early)


def evaluate_accuracy(model: nn.Module, batches, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` (eval mode, no grad) on (x, y) batches."""
    _, acc = _evaluate(model, list(batches), _Loss(None, None, 0.0), torch.device(device))
    if acc is None:
        raise PassError("evaluate_accuracy needs (x, y) batches with class-index targets")
    return acc


def predict(model: nn.Module, batches, device: torch.device | str = "cpu") -> torch.Tensor:
    """Concatenated logits of `model` (eval mode, no grad) over the batches' inputs."""
    model.eval()
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs, _ = _to_device(batch, torch.device(device))
            out.append(_logits(model(*inputs)).cpu())
    return torch.cat(out)


class _Loss:
    """Cross entropy on the labels, blended with the distillation term when a teacher is given.

    Hinton, Vinyals & Dean 2015, Sec. 2: L = (1 - a) CE(s, y) + a T^2 KL(softmax(t / T) || softmax(s / T)).
    """

    def __init__(self, teacher: nn.Module | None, temperature: float | None, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, logits: torch.Tensor, inputs: tuple, y: torch.Tensor | None) -> torch.Tensor:
        if self.teacher is None:
            if y is None:
                raise PassError("batches carry no targets; give (x, y) batches or set kd_temperature")
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


def _to_device(batch: Any, device: torch.device) -> tuple[tuple, torch.Tensor | None]:
    inputs, y = split_batch(batch)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return inputs, (y.to(device) if isinstance(y, torch.Tensor) else y)


def _logits(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise PassError(f"the model must return a logits tensor, got {type(out).__name__}")
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


def fit_record_empty() -> dict:
    """The record of a training run that took no step."""
    return _record(0, 0, None, None, None, False)


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
