"""The C4-equivariant CNN of the zoo (e2cnn), its plain-torch export and its field layout.

`C4Net` is written the way e2cnn users write models: an nn.Module whose forward wraps the input in a
`GeometricTensor`, runs e2cnn modules (`R2Conv`, `InnerBatchNorm`, `ReLU`, `PointwiseMaxPool`,
`GroupPooling` on the rot90 group C4 with regular fields) and unwraps `.tensor` for a plain pooled MLP head.
e2cnn modules are not fx-traceable (their forwards assert on field types and shapes), so `export_plain`
builds the plain-torch twin from each module's `.export()`; e2cnn 0.2.3 exports GroupPooling to
`MaxPoolChannels`, whose forward asserts on `input.shape` (a traced value) and so breaks torch.fx, hence the
exact replacement `GroupMaxPool`. `fxslim.trace(C4Net(...))` needs no twin: the e2cnn adapter does the same
conversion while tracing. `field_layout` records which channels form one field (a C4 regular field
is 4 consecutive channels, permuted by a rotation): a pass must remove or merge whole fields, never single
channels, or the model loses its invariance. This file only defines models; it never trains them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from e2cnn import gspaces
from e2cnn import nn as enn
from torch import nn

# The layout record, the plain GroupPooling and the layout reader live in the e2cnn adapter (fxslim core);
# they are re-exported here for code that builds zoo models.
from fxslim.e2cnn_adapter import FieldLayout, GroupMaxPool, field_layout
from fxslim.module_state import restored_modes

__all__ = ["C4_ORDER", "C4Net", "C4NetPlain", "FieldLayout", "GroupMaxPool", "export_plain", "field_layout"]

C4_ORDER = 4  # rotations by 0, 90, 180 and 270 degrees; a regular field has one channel per rotation


class C4Net(nn.Module):
    """A C4-equivariant CNN (Cohen & Welling 2016; Weiler & Cesa 2019 for e2cnn) with an invariant head.

    features: for each entry of `fields`, R2Conv(k = `kernels[i]`, same padding, no bias: BN follows) →
    InnerBatchNorm → ReLU to `fields[i]` regular fields (4·fields[i] channels), and a 2×2 PointwiseMaxPool
    after the blocks listed in `pool_after`; then GroupPooling (max over each field's 4 rotations) gives
    rotation-invariant channels, a global spatial max (or mean) pool and an MLP head
    linear(fields[-1] → `hidden`) → ReLU → linear(`num_classes`).

    Input (N, `in_ch`, H, W). The logits are invariant to `torch.rot90(x, k, (2, 3))` exactly (up to fp32
    rounding) when H and W are divisible by 2**len(pool_after): 28×28 with the default single pool
    (a 29×29 input drops a different row in the pool for each rotation; see docs/notes/facts.md)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_ch: int = 1,
        fields: Sequence[int] = (4, 8, 16),
        kernels: Sequence[int] = (5, 3, 3),
        pool_after: Sequence[int] = (1,),
        hidden: int = 64,
        spatial_pool: str = "max",
    ) -> None:
        super().__init__()
        if len(fields) != len(kernels) or any(k % 2 == 0 for k in kernels):
            raise ValueError(f"need one odd kernel size per block: fields={fields}, kernels={kernels}")
        if spatial_pool not in ("max", "mean"):
            raise ValueError(f"spatial_pool must be 'max' or 'mean', got {spatial_pool!r}")
        gspace = gspaces.Rot2dOnR2(N=C4_ORDER)
        # Trivial fields: a plain image channel is rotated as a whole, its value is not permuted.
        self.in_type = enn.FieldType(gspace, in_ch * [gspace.trivial_repr])
        layers: list[enn.EquivariantModule] = []
        t = self.in_type
        for i, (f, k) in enumerate(zip(fields, kernels, strict=True)):
            out = enn.FieldType(gspace, f * [gspace.regular_repr])
            layers += [
                enn.R2Conv(t, out, k, padding=k // 2, bias=False),
                enn.InnerBatchNorm(out),
                enn.ReLU(out, inplace=True),
            ]
            if i in pool_after:
                layers.append(enn.PointwiseMaxPool(out, 2))
            t = out
        self.features = enn.SequentialModule(*layers)
        self.gpool = enn.GroupPooling(t)
        self.pool = nn.AdaptiveMaxPool2d(1) if spatial_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(fields[-1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gpool(self.features(enn.GeometricTensor(x, self.in_type))).tensor
        return self.head(torch.flatten(self.pool(y), 1))


class C4NetPlain(nn.Module):
    """The plain-torch twin of a `C4Net` (built by `export_plain`): same submodule names, no e2cnn types.

    Carries `fxslim_meta` ({"group": "C4", "field_layout": [...]}), which `fxslim.trace` copies into the
    GraphModule's `meta` so later passes know which channels form one field."""

    def __init__(
        self,
        features: nn.Sequential,
        gpool: GroupMaxPool,
        pool: nn.Module,
        head: nn.Sequential,
        layout: list[FieldLayout],
    ) -> None:
        super().__init__()
        self.features, self.gpool, self.pool, self.head = features, gpool, pool, head
        self.fxslim_meta = {"group": f"C{C4_ORDER}", "field_layout": layout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.gpool(self.features(x))), 1))


def _field_size(ftype: enn.FieldType, where: str) -> int:
    sizes = {r.size for r in ftype.representations}
    if len(sizes) != 1:
        raise ValueError(f"{where}: fields of mixed sizes {sorted(sizes)} are not supported")
    return sizes.pop()


def export_plain(model: C4Net) -> C4NetPlain:
    """The plain-torch equivalent of `model`, in eval mode, sharing no tensor with it (`model` is left as is).

    R2Conv → Conv2d with the expanded filter, InnerBatchNorm → BatchNorm2d with each field's statistics
    repeated over its 4 channels, ReLU → ReLU, PointwiseMaxPool → MaxPool2d (all by e2cnn's `.export()`),
    GroupPooling → `GroupMaxPool`. The twin is equivariant only while its weights keep that expanded
    structure: train the e2cnn model, not the twin, or project the twin's weights back after each step."""
    # e2cnn's export() switches modules to eval mode (it caches the expanded filters there); restore after.
    with restored_modes(model):
        features = model.features.export()
    gsize = _field_size(model.gpool.in_type, "gpool")
    # Deep copy: export() hands back views of e2cnn's cached filters, and the head is the model's own.
    plain = C4NetPlain(features, GroupMaxPool(gsize), model.pool, model.head, field_layout(model))
    return copy.deepcopy(plain).eval()
