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
is adding a row to the table. This package must never guess: an op without a row is frozen, not assumed
elementwise."""

from fxslim.graph.rules.attention import (
    multihead_attention,
    multihead_attention_update,
    patch_merging_pad,
    relative_position_bias,
    sdpa,
    window_attention,
    window_attention_update,
)
from fxslim.graph.rules.base import CHANNEL, FIXED, SLICE, CoupleFn, DepsBuilder, Ids, PlanApplier, UpdateFn
from fxslim.graph.rules.contraction import einsum, matmul
from fxslim.graph.rules.elementwise_reduce import elementwise, no_tensor, passthrough, reduce_dims, spatial
from fxslim.graph.rules.layers import (
    batchnorm,
    batchnorm_update,
    channel_affine,
    conv,
    conv_transpose,
    conv_transpose_update,
    conv_update,
    embedding,
    embedding_update,
    groupnorm,
    groupnorm_update,
    layernorm,
    layernorm_fn,
    layernorm_fn_update,
    layernorm_update,
    linear,
    linear_update,
    prelu,
    prelu_update,
)
from fxslim.graph.rules.shape_ops import (
    concat,
    expand,
    expand_update,
    gather_rows,
    getitem,
    getitem_update,
    permute,
    reshape,
    reshape_update,
    split,
    split_update,
    stack,
)
from fxslim.graph.rules.sizes import reads_changed_size
from fxslim.graph.rules.table import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    Rule,
    rule_for,
)

__all__ = [
    "CHANNEL",
    "FIXED",
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "SLICE",
    "CoupleFn",
    "DepsBuilder",
    "Ids",
    "PlanApplier",
    "Rule",
    "UpdateFn",
    "batchnorm",
    "batchnorm_update",
    "channel_affine",
    "concat",
    "conv",
    "conv_transpose",
    "conv_transpose_update",
    "conv_update",
    "einsum",
    "elementwise",
    "embedding",
    "embedding_update",
    "expand",
    "expand_update",
    "gather_rows",
    "getitem",
    "getitem_update",
    "groupnorm",
    "groupnorm_update",
    "layernorm",
    "layernorm_fn",
    "layernorm_fn_update",
    "layernorm_update",
    "linear",
    "linear_update",
    "matmul",
    "multihead_attention",
    "multihead_attention_update",
    "no_tensor",
    "passthrough",
    "patch_merging_pad",
    "permute",
    "prelu",
    "prelu_update",
    "reads_changed_size",
    "reduce_dims",
    "relative_position_bias",
    "reshape",
    "reshape_update",
    "rule_for",
    "sdpa",
    "spatial",
    "split",
    "split_update",
    "stack",
    "window_attention",
    "window_attention_update",
]
