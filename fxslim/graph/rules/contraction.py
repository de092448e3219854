"""Channel rules of contractions without a parameter of their own (matmul, bmm, einsum): contracted dims
are tied across the operands, and a parameter operand's contracted dim is marked as consumer columns."""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from fxslim.graph.rules.base import FIXED, DepsBuilder, Ids


def matmul(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    a, c = deps.ids(node.args[0]), deps.ids(node.args[1])
    shape = deps.shape(node)
    if a is None or c is None or len(a) < 2 or len(c) < 2 or shape is None:
        return None
    deps.unify(a[-1], c[-2])
    deps.mark_summed(node.args[0], len(a) - 1)  # a parameter operand's contracted dim is consumer columns
    deps.mark_summed(node.args[1], len(c) - 2)
    batch = broadcast_dims(deps, a[:-2], c[:-2], shape[:-2])
    return batch + [a[-2], c[-1]]


def broadcast_dims(deps: DepsBuilder, xa: Ids, xc: Ids, shape) -> Ids:
    """The batch dims of a broadcast between two operands: full-size dims of both are tied."""
    out = []
    for d in range(len(shape)):
        cands = [x[len(x) - len(shape) + d] for x in (xa, xc) if len(x) - len(shape) + d >= 0]
        cands = [c for c in cands if len(c) == shape[d]]
        for c in cands[1:]:
            deps.unify(cands[0], c)
        out.append(cands[0] if cands else deps.fresh_dim(shape[d], FIXED))
    return out


def einsum(deps: DepsBuilder, node: fx.Node, mod: nn.Module | None = None) -> Ids | None:
    """torch.einsum: every occurrence of one subscript letter is the same index (contracted letters too)."""
    eq = node.args[0]
    operands = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return None
    lhs, out_letters = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    xs = [deps.ids(o) for o in operands]
    if len(terms) != len(xs) or any(x is None or len(x) != len(t) for x, t in zip(xs, terms, strict=False)):
        return None
    seen: dict[str, np.ndarray] = {}
    for term, x, operand in zip(terms, xs, operands, strict=True):
        for d, (letter, ids) in enumerate(zip(term, x, strict=True)):
            if letter not in out_letters:
                deps.mark_summed(operand, d)
            if letter not in seen or len(seen[letter]) == 1:
                seen[letter] = ids
            elif len(ids) == len(seen[letter]):
                deps.unify(seen[letter], ids)
    return [seen[letter] for letter in out_letters]
