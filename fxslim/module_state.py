"""Small helpers about a module's state that many passes need: run in eval mode and put every module's own
training flag back (also on an exception), and the device a module lives on. Nothing here changes weights."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def restored_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule's own training flag back afterwards, whatever the body switched (a mixed state survives;
    e.g. e2cnn's `export()` switches its modules to eval)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own training flag back."""
    with restored_modes(module):
        module.eval()
        yield module


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
