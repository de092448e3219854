"""The per-op channel rules: ONE table (table.py) mapping an op (module type, function or method name) to a `Rule`.

A rule's `couple(deps, node, mod)` states how the op maps the channel indices of its inputs to those of its
output, through the dependency builder `deps` (a `DepsBuilder`; see base.py, and deps.py for the builder):
`deps.unify` ties indices that must be removed together, `deps.fresh_dim` makes new indices (CHANNEL: a new
prunable channel space such as a conv's output; FIXED: never prunable, e.g. spatial positions), `deps.param`
ties a parameter's dims to channel indices (the rewriter slices or merges those dims). It returns the id
arrays of the output (one per dim; a tuple of them for tuple outputs), False for an op that only reads
sizes, or None when the op cannot be handled, which freezes everything it touches. A rule's optional
`update(applier, node, mod)` fixes module attributes / node arguments after channels changed, through the
plan applier `applier` (a `PlanApplier`; see rewrite.py). Both take their context first, then the node, then
the called module (None for functions and methods).

The rule functions are grouped by family: elementwise_reduce.py (elementwise, activations, reductions,
pooling), shape_ops.py (cat, split, permute, view/reshape, expand, indexing; sizes.py rewrites their size
arguments), contraction.py (matmul, einsum), layers.py (conv, linear, norms, ...), attention.py. Adding an op
is adding a row to the table (from outside the core: `fxslim.register_op`). This package exports the table
and what a rule is written against; the rule functions are imported from their family modules. It must
never guess: an op without a row is frozen, not assumed elementwise."""

from fxslim.graph.rules.base import CHANNEL, FIXED, SLICE, CoupleFn, DepsBuilder, Ids, PlanApplier, UpdateFn
from fxslim.graph.rules.sizes import reads_changed_size
from fxslim.graph.rules.table import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Rule, rule_for

__all__ = [
    "CHANNEL", "FIXED", "FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "SLICE", "CoupleFn", "DepsBuilder", "Ids",
    "PlanApplier", "Rule", "UpdateFn", "reads_changed_size", "rule_for",
]
