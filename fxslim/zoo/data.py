"""Small datasets for tests, the demo and tools, available offline (no downloads): today scikit-learn's
digits (1,797 grey 8×8 images of handwritten digits, shipped inside the scikit-learn package). Loaders
are plain lists of (x, y) batches: re-iterable, deterministic for a seed, and accepted wherever fxslim
takes `data=`. This file never trains or changes a model."""

from __future__ import annotations

import torch

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (x, y): x float32 (1797, 1, 8, 8) scaled from 0..16 to [0, 1], y int64 (1797,) in 0..9."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed when the data is used

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x, y


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[Batches, Batches]:
    """(train, test) lists of (x, y) batches: a seeded 80/20 random split of the digits.

    The split and the (fixed) order of the training samples depend only on `seed`; the last batch of
    each list may be smaller than `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, y = digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    return _batches(x, y, order[:n_train], batch_size), _batches(x, y, order[n_train:], batch_size)


def _batches(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, batch_size: int) -> Batches:
    return [(x[index[i : i + batch_size]], y[index[i : i + batch_size]]) for i in range(0, len(index), batch_size)]
