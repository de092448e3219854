"""Training harness: a zoo model trained on a zoo dataset once, cached on disk, and evaluated.

`train_baseline(model, dataset, ...)` trains with the one training loop (`fxslim.training.fit`: seeded,
Adam or SGD, schedulers, tqdm, early stopping) and caches the weights under
`$FXSLIM_CACHE/checkpoints/` (default `~/.cache/fxslim/checkpoints/`), keyed by a hash of (model, model
arguments, dataset, dataset arguments, training config). Later calls load them with
`torch.load(weights_only=True)`. `evaluate` gives accuracy overall, at SNR >= 10 dB and per SNR for AMR
data. This file never changes a model it did not build."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxslim.cache import cache_root
from fxslim.training import fit, predict
from fxslim.zoo import amr
from fxslim.zoo import data as zdata
from fxslim.zoo.errors import DataError
from fxslim.zoo.models import build

CHECKPOINT_VERSION = 1  # bump when training semantics change, so stale checkpoints are not reused


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the FCOS paper's AMR setup (Adam 1e-3, StepLR(10, 0.8), batch 128)."""

    epochs: int = 30
    lr: float = 1e-3
    optimizer: str = "adam"
    scheduler: str | None = "step"
    step_size: int = 10
    gamma: float = 0.8
    weight_decay: float = 0.0
    batch_size: int = 128
    patience: int | None = 8
    seed: int = 0


@dataclass
class Dataset:
    """Batches for training, validation (early stopping) and test; `test_snr` labels AMR test frames."""

    name: str
    train: list
    val: list
    test: list
    num_classes: int
    classes: list[str] = field(default_factory=list)
    test_snr: np.ndarray | None = None

    def example(self, batch: int = 1) -> torch.Tensor:
        return self.test[0][0][:batch]


def _amr(batch_size: int, seed: int, n_per_class_snr: int = 100, length: int = 128, **kwargs) -> Dataset:
    full = amr.load_or_generate(n_per_class_snr=n_per_class_snr, length=length, seed=seed, **kwargs)
    train, val, test = amr.splits(full, val=0.1, test=0.2, seed=seed)
    return Dataset("amr", amr.to_loader(train, batch_size, shuffle=True, seed=seed), amr.to_loader(val, 512),
                   amr.to_loader(test, 512), len(full.classes), list(full.classes), test.snr)


def _held_out(train: list, val_batches: int) -> tuple[list, list]:
    """Split off the last batches of a seeded, shuffled training list for early stopping."""
    return train[:-val_batches], train[-val_batches:]


def _digits(batch_size: int, seed: int) -> Dataset:
    train, test = zdata.digits_loaders(batch_size=batch_size, seed=seed)
    train, val = _held_out(train, max(1, len(train) // 10))
    return Dataset("digits", train, val, test, 10, [str(i) for i in range(10)])


def _mnist1d(batch_size: int, seed: int, **kwargs) -> Dataset:
    train, test = zdata.mnist1d_loaders(batch_size=batch_size, seed=seed, **kwargs)
    train, val = _held_out(train, max(1, len(train) // 10))
    return Dataset("mnist1d", train, val, test, 10, [str(i) for i in range(10)])


def _rotated_digits(batch_size: int, seed: int, **kwargs) -> Dataset:
    train, test = zdata.rotated_digits(batch_size=batch_size, seed=seed, **kwargs)
    train, val = _held_out(train, max(1, len(train) // 10))
    return Dataset("rotated_digits", train, val, test, 10, [str(i) for i in range(10)])


DATASETS = {"amr": _amr, "digits": _digits, "mnist1d": _mnist1d, "rotated_digits": _rotated_digits}


def load_dataset(name: str, *, batch_size: int = 128, seed: int = 0, **kwargs) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name](batch_size=batch_size, seed=seed, **kwargs)


def checkpoint_path(model: str, model_kwargs: dict, dataset: str, data_kwargs: dict, config: TrainConfig) -> Path:
    generator = amr.GENERATOR_VERSION if dataset == "amr" else None  # new synthetic data: new checkpoint
    key = json.dumps({"model": model, "model_kwargs": model_kwargs, "data": dataset, "data_kwargs": data_kwargs,
                      "config": asdict(config), "version": CHECKPOINT_VERSION, "generator": generator},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "checkpoints" / f"{model}-{dataset}-{digest}.pt"


@dataclass
class Trained:
    model: nn.Module
    dataset: Dataset
    info: dict  # what training did and measured: seconds, record, evaluation
    path: Path
    cached: bool


def train_baseline(model_name: str, dataset: str, *, model_kwargs: dict | None = None,
                   data_kwargs: dict | None = None, config: TrainConfig = TrainConfig(),  # noqa: B008 (frozen)
                   cache: bool = True, force: bool = False) -> Trained:
    """Build `model_name`, train it on `dataset` (or load the cached weights) and evaluate it on the test set."""
    model_kwargs, data_kwargs = dict(model_kwargs or {}), dict(data_kwargs or {})
    ds = load_dataset(dataset, batch_size=config.batch_size, seed=config.seed, **data_kwargs)
    model_kwargs.setdefault("num_classes", ds.num_classes)
    torch.manual_seed(config.seed)
    model = build(model_name, **model_kwargs)
    path = checkpoint_path(model_name, model_kwargs, dataset, data_kwargs, config)
    if cache and not force and path.exists():
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state["state_dict"])
        return Trained(model.eval(), ds, json.loads(state["info"]), path, cached=True)
    t0 = time.perf_counter()
    record = fit(model, lambda epoch: (ds.train, ds.val), epochs=config.epochs, lr=config.lr,
                 optimizer=config.optimizer, weight_decay=config.weight_decay, scheduler=config.scheduler,
                 step_size=config.step_size, gamma=config.gamma, patience=config.patience, seed=config.seed,
                 desc=f"train {model_name}")
    info = {"model": model_name, "model_kwargs": model_kwargs, "dataset": dataset, "data_kwargs": data_kwargs,
            "config": asdict(config), "train_seconds": time.perf_counter() - t0, "record": record,
            "eval": evaluate(model, ds)}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # write-then-rename: never half a file
        torch.save({"state_dict": model.state_dict(), "info": json.dumps(info)}, tmp)
        os.replace(tmp, path)
    return Trained(model.eval(), ds, info, path, cached=False)


def evaluate(model: nn.Module, ds: Dataset) -> dict:
    """Test accuracy; for AMR data also accuracy at SNR >= 10 dB and per SNR."""
    logits = predict(model, ds.test).numpy()
    y = torch.cat([b[1] for b in ds.test]).numpy()
    out = {"accuracy": float((logits.argmax(1) == y).mean())}
    if ds.test_snr is not None:
        correct = logits.argmax(1) == y
        out["accuracy_snr_ge10"] = float(correct[ds.test_snr >= 10].mean())
        out["per_snr"] = {int(s): float(correct[ds.test_snr == s].mean()) for s in np.unique(ds.test_snr)}
    return out
