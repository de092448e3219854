"""A model's declared symmetry, as the core sees it: the group and channel layout kept in `gm.meta` (written by
a trace adapter) and the handler an adapter registers for that group (`register_symmetry`). The pass manager
checks invariance through `rotations`, the layout stays current through `refresh_layout_`, training and
least-squares re-fits keep weights equivariant through `project_`, and BatchNorm recalibration pools each
field's statistics through `pool_statistics_`. A model that declares no group, or one no handler claims,
gets none of this (every call is a no-op or says "none"). This file names no adapter and no group."""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

GROUP_META, LAYOUT_META = "group", "field_layout"  # gm.meta keys: the group's name, the per-layer field layout


class SymmetryHandler(Protocol):
    """What an adapter provides for the groups it claims."""

    def claims(self, group: str) -> bool:
        """Whether this handler knows `group` (e.g. "C4")."""

    def rotations(self, group: str) -> list[int]:
        """The multiples k of 90° whose `torch.rot90(x, k)` is in the group (empty: nothing to check by rot90)."""

    def refresh_layout(self, gm: nn.Module, layout: list) -> list:
        """The layout with counts read from the layers' current sizes; a PassError when a layer lost part of a
        field."""

    def can_project(self, gm: nn.Module) -> bool:
        """Whether `project_` and `pool_statistics_` apply to `gm`."""

    def project_(self, gm: nn.Module) -> None:
        """Project the weights onto the equivariant subspace, in place."""

    def pool_statistics_(self, gm: nn.Module) -> None:
        """Give each field's BatchNorm channels the field's pooled statistics, in place."""


_HANDLERS: list[SymmetryHandler] = []


def register_symmetry(handler: SymmetryHandler) -> None:
    """Make the core use `handler` for the groups it claims."""
    if handler not in _HANDLERS:
        _HANDLERS.append(handler)


def declared_group(gm: nn.Module) -> str | None:
    return _meta(gm).get(GROUP_META)


def _meta(gm: nn.Module) -> dict[str, Any]:
    return getattr(gm, "meta", None) or {}


def _handler(gm: nn.Module) -> SymmetryHandler | None:
    group = declared_group(gm)
    return next((h for h in _HANDLERS if group and h.claims(group)), None)


def rotations(gm: nn.Module) -> list[int]:
    """The rot90 multiples `gm`'s outputs must be invariant to (empty when it declares no known group)."""
    handler = _handler(gm)
    return handler.rotations(declared_group(gm)) if handler else []


def refresh_layout_(gm: nn.Module) -> None:
    """Re-read the declared layout from the layers' current sizes (PassError when a field was cut)."""
    layout, handler = _meta(gm).get(LAYOUT_META), _handler(gm)
    if layout and handler:
        gm.meta[LAYOUT_META] = handler.refresh_layout(gm, layout)


def can_project(gm: nn.Module) -> bool:
    handler = _handler(gm)
    return handler is not None and handler.can_project(gm)


def project_(gm: nn.Module) -> None:
    if can_project(gm):
        _handler(gm).project_(gm)


def pool_statistics_(gm: nn.Module) -> None:
    if can_project(gm):
        _handler(gm).pool_statistics_(gm)
