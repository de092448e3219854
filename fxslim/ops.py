"""One registration point for an op: `register_op` makes a module type, a function or a Tensor method known
to every stage that reads ops — the tracer (a leaf module type is kept as one node), the channel-rule table
(`fxslim/graph/rules/table.py`: how the op couples channels and how a plan updates it), the MAC counter
(`fxslim/graph/cost.py`) and the latency model of `prune_channels(objective="latency")`. fxslim's own
adapters use it exactly as a user does. This file holds no rule and never imports an adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from fxslim.errors import FxslimError
from fxslim.graph import cost
from fxslim.graph.rules import table
from fxslim.graph.rules.base import CoupleFn, UpdateFn
from fxslim.graph.rules.table import Rule
from fxslim.modules import SlimMultiheadAttention

LATENCY_KINDS = ("op",)  # "op": a memory-bound op, timed alone and scaled with its kept output channels

# Targets `register_op(..., latency="op")` declared: module types, functions, method names.
LATENCY_OPS: set[Any] = set()
# Module types torch.fx keeps as one node (fxslim's own and the registered ones); the tracer reads this.
LEAF_TYPES: set[type] = set()


class RegistrationError(FxslimError):
    """`register_op` was given a target or an option it cannot use."""


def register_op(
    target: type | Callable | str,
    *,
    rule: Rule | CoupleFn | None = None,
    update: UpdateFn | None = None,
    rewrites_size_args: bool = False,
    macs: Callable[[fx.Node, nn.Module | None], int] | type | Callable | str | None = None,
    leaf: bool | None = None,
    latency: str | None = None,
) -> None:
    """Make an op known to fxslim.

    target: an `nn.Module` subclass, a function torch.fx keeps as a call (e.g. one passed to
        `torch.fx.wrap`) or a Tensor method name ("view").
    rule: how the op couples channels: a `Rule`, or its `couple(deps, node, module)` function
        (fxslim/graph/rules/base.py says what `deps` offers; return the output's id arrays, one per dim).
    update: with a couple function, `update(applier, node, module)` that fixes module attributes once a
        plan changed channels (the parameters are already sliced). rewrites_size_args: see `Rule`.
    macs: `macs(node, module) -> int` (per the whole batch, from `node.meta["tensor_meta"]`), or an op
        already counted whose rule applies as it is (e.g. `nn.Conv2d`).
    leaf: module types only; True (the default for a module type given a rule) keeps it one node in the
        graph so its rule applies; its forward is never traced into.
    latency: "op" counts it among the memory-bound ops `prune_channels(objective="latency")` times; None
        (the default) leaves it out of the latency model.
    An op without a rule keeps freezing the channels it touches, as every unknown op does."""
    is_module = isinstance(target, type) and issubclass(target, nn.Module)
    if not (is_module or isinstance(target, str) or callable(target)):
        raise RegistrationError(
            f"register_op: {target!r} is not an nn.Module subclass, a function or a method name"
        )
    if leaf and not is_module:
        raise RegistrationError(f"register_op: leaf=True applies to nn.Module subclasses, not {target!r}")
    if latency not in (None, *LATENCY_KINDS):
        raise RegistrationError(f"register_op: latency={latency!r}; valid: None, {', '.join(LATENCY_KINDS)}")
    if update is not None and (rule is None or isinstance(rule, Rule)):
        raise RegistrationError("register_op: update= goes with a couple function in rule=, not with a Rule")
    if rule is not None:
        if not isinstance(rule, Rule):
            if not callable(rule):
                raise RegistrationError(f"register_op: rule={rule!r} is neither a Rule nor a couple function")
            rule = Rule(rule, update, rewrites_size_args)
        rows = table.MODULE_RULES if is_module else table.FUNCTION_RULES
        rows = table.METHOD_RULES if isinstance(target, str) else rows
        rows[target] = rule
    if macs is not None:
        cost.MAC_RULES[target] = _mac_rule(target, macs)
    if is_module and (leaf or (leaf is None and rule is not None)):
        LEAF_TYPES.add(target)
    if latency is not None:
        LATENCY_OPS.add(target)


def _mac_rule(target, macs) -> Callable:
    if macs in cost.MAC_RULES:  # an op already counted: its rule applies as it is
        return cost.MAC_RULES[macs]
    if isinstance(macs, (type, str)) or not callable(macs):
        raise RegistrationError(f"register_op({target!r}): macs={macs!r} is neither a function nor a counted op")
    return macs


def is_latency_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `register_op(..., latency="op")` declared the op `node` calls."""
    if node.op == "call_module":  # a subclass counts only while it keeps the registered type's forward (rule_for)
        kind = type(gm.get_submodule(node.target))
        return any(t in LATENCY_OPS and kind.forward is t.forward for t in kind.__mro__)
    if node.op in ("call_function", "call_method"):
        try:
            return node.target in LATENCY_OPS
        except TypeError:  # an unhashable callable cannot have been registered
            return False
    return False


# fxslim's own leaf: the attention it swaps in for nn.MultiheadAttention (its rule and MACs are table rows).
register_op(SlimMultiheadAttention, leaf=True)
