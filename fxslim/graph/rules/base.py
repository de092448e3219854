"""What every family of channel rules shares: the kinds of index, the two protocols through which a rule reads and
writes (`DepsBuilder` while the graph is analysed, `PlanApplier` while a plan is applied), the signatures of
the two kinds of rule function, and argument helpers. Every rule function takes its context first, then the
node, then the called module (None for functions and methods). This file holds no rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
from torch import fx, nn

if TYPE_CHECKING:
    from fxslim.rewrite import ChannelPlan

FIXED, CHANNEL, SLICE = 0, 1, 2  # kinds of index: never prunable / a prunable channel / a parameter dim

Ids = list  # one int64 numpy array of index ids per tensor dim


class DepsBuilder(Protocol):
    """What a rule's `couple` may ask of the dependency builder (`fxslim.graph.deps.Builder`) while the graph is
    walked once in topological order. Values are fx nodes; their ids are those recorded so far."""

    def fresh_dim(self, size: int, kind: int) -> np.ndarray:
        """`size` new ids of one kind: CHANNEL (a new prunable channel space) or FIXED (never prunable)."""

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Index a[i] and index b[i] are removed together (the arrays broadcast)."""

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        """These indices are never removed, for `reason` (shown in `Group.reason`)."""

    def freeze_value(self, value: object, reason: str) -> None:
        """Freeze every dim of a node's value (or of a list / tuple of id arrays)."""

    def mark_summed(self, value: object, dim: int) -> None:
        """`value`'s dim `dim` is contracted: a parameter's such dim is consumer columns (summed on a merge)."""

    def may_prune(self, ids: np.ndarray) -> bool:
        """Whether any of these indices is a channel or a parameter dim (not FIXED)."""

    def raw(self, arg: object) -> Ids | tuple | None:
        """The recorded value of a node: a list of id arrays (a tensor), a tuple of those, or None."""

    def ids(self, arg: object) -> Ids | None:
        """The id arrays of a tensor node, one per dim (None for anything else)."""

    def is_tensor(self, arg: object) -> bool:
        """Whether `arg` is a node whose value is one tensor."""

    def shape(self, node: object) -> tuple | None:
        """The node's output shape from shape propagation (None unless it is one tensor)."""

    def shapes(self, node: fx.Node) -> list | None:
        """The shapes of a node's tuple output (None unless it is a tuple)."""

    def param(self, node: fx.Node, attr: str, kinds: list, roles: list, like: list | None = None) -> list:
        """The ids of the dims of parameter `attr` of the module `node` calls: new ids of `kinds`, or `like`'s
        ids where given; `roles` say how a merge combines each dim ("out", "in", "norm", "param")."""


class PlanApplier(Protocol):
    """What a rule's `update` may ask while a `ChannelPlan` is applied (`fxslim.rewrite._Applier`): the ids are
    those of the analysed graph, `gm` is the new module whose nodes and submodules the update edits."""

    plan: ChannelPlan
    gm: fx.GraphModule
    sizes: dict[fx.Node, tuple[bool, bool]]  # `sizes.reads_changed_size`'s answers, kept for the whole plan

    def ids(self, node: object) -> Ids | None:
        """The id arrays the node's value had when the graph was analysed."""

    def new_size(self, ids: np.ndarray) -> int:
        """The size of a dim with these ids once the plan is applied."""

    def new_shapes(self, node: object) -> list | None:
        """The node's planned shape (a list of shapes for a tuple output)."""

    def kept_positions(self, ids: np.ndarray) -> np.ndarray:
        """A bool mask over a dim's positions: those the plan keeps as they are."""


CoupleFn = Callable[[DepsBuilder, fx.Node, nn.Module | None], Ids | tuple | bool | None]
UpdateFn = Callable[[PlanApplier, fx.Node, nn.Module | None], None]


def call_arg(node: fx.Node, i: int, name: str, default=None):
    """Argument `i` of the call, or keyword `name`."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d
