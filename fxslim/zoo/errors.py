"""Typed errors of the zoo's data loaders and generators. Kept apart from `fxslim.errors` so the zoo can grow
its own failure kinds without touching the core; every class here still derives from `FxslimError`, so the
CLI reports it as `error: <message>`. This file must never import torch, numpy or any data code."""

from __future__ import annotations

from fxslim.errors import FxslimError


class DataError(FxslimError, ValueError):
    """A dataset could not be built or read: a missing folder, an unreadable file (named), inconsistent
    image sizes, or a bad argument. Also a ValueError because the loaders raised plain ValueErrors for bad
    arguments before this class existed, and callers catching those must keep working."""
