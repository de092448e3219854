"""The model zoo: small, readable reference networks for tests, the demo, tools and the method benchmarks.

Each model covers structures the passes must handle: BatchNorm to fold, residual adds and concatenations that
couple channels, strided 1×1 projections, depthwise convs, a flatten → linear head that couples channels with
spatial positions. Every forward is plain torch.fx-traceable (no data-dependent Python, no iteration over a
shape), and `dims` picks 1-D (I/Q frames, N×C×L) or 2-D (images, N×C×H×W) layers where a model has both.
The C4-equivariant e2cnn net lives in `fxslim.zoo.e2` (it needs e2cnn; `build("c4net")` imports it lazily).
This file only defines models; it never trains, loads weights or downloads anything."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Layer types per spatial rank, so one class definition serves 1-D signals and 2-D images.
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _check_dims(dims: int) -> int:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (N×C×L signals) or 2 (N×C×H×W images), got {dims!r}")
    return dims


def conv_bn(cin: int, cout: int, k: int, dims: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv(k, 'same' padding for odd k) + BN, no bias: the BN shift makes a conv bias redundant."""
    return nn.Sequential(_CONV[dims](cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                         _BN[dims](cout))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3-BN-ReLU-conv3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, else a strided 1×1 conv + BN projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dims: int = 2) -> None:
        super().__init__()
        conv, bn = _CONV[_check_dims(dims)], _BN[dims]
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class DigitsResNet(nn.Module):
    """A residual CNN for the 1×8×8 images of scikit-learn's digits (10 classes); 77,290 parameters at
    the default width.

    stem: conv3×3(1→`width`) + BN + ReLU, 8×8
    layer1: BasicBlock(`width`→`width`), 8×8 (identity shortcut: its channels are coupled to the stem's)
    layer2: BasicBlock(`width`→2·`width`, stride 2) with a 1×1 projection shortcut, 4×4
    head: adaptive average pool → flatten → linear(2·`width` → `num_classes`)

    Input (N, 1, 8, 8) float in [0, 1]; output (N, `num_classes`) logits."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class CNN1D(nn.Module):
    """The plain AMR CNN of the FCOS paper's experiments (papers/fcos-2505.21571, docs/notes/papers.md): `depth`
    blocks of conv1d(k=`kernel`)-BN-ReLU-maxpool(2), then flatten → linear(`hidden`) → ReLU → dropout → linear.

    The head flattens C×L on purpose (as the AMR CNNs do): the first linear's input columns are tied to
    channel × position, which the dependency analyzer must slice per channel. Input (N, `in_ch`, `length`)
    with `length` divisible by 2**`depth` (default 2×128 I/Q frames: 4 pools → 8 positions); output
    (N, `num_classes`) logits."""

    def __init__(self, num_classes: int = 11, in_ch: int = 2, length: int = 128, width: int = 64,
                 depth: int = 4, kernel: int = 7, hidden: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        if length % 2**depth:
            raise ValueError(f"length {length} must be divisible by 2**depth = {2**depth} (one 2× pool per block)")
        blocks, cin = [], in_ch
        for _ in range(depth):
            blocks += [conv_bn(cin, width, kernel, dims=1), nn.ReLU(), nn.MaxPool1d(2)]
            cin = width
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(width * (length >> depth), hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): conv3-BN-ReLU stem, three stages of (depth-2)/6 basic
    blocks with widths w, 2w, 4w (stride 2 and a 1×1 conv+BN projection shortcut entering stages 2 and 3),
    global average pool → linear. ResNet-20 has 3 blocks per stage, ResNet-56 has 9.

    Padding keeps every size valid: the output is (N, `num_classes`) for any input length / H×W ≥ 1
    (2-D: 8×8 digits → 8, 4, 2; 28×28 → 28, 14, 7; a 1×2×128 I/Q frame as an image → 2×128, 1×64, 1×32;
    1-D: 2×128 I/Q → 128, 64, 32)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_ch: int = 3, width: int = 16,
                 dims: int = 2) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(conv_bn(in_ch, width, 3, _check_dims(dims)), nn.ReLU())
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1, dims)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = _GAP[dims](1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet1D(ResNet):
    """`ResNet` with 1-D convs for I/Q frames (N, `in_ch`=2, L); defaults sized for 11-class AMR."""

    def __init__(self, depth: int = 20, num_classes: int = 11, in_ch: int = 2, width: int = 16) -> None:
        super().__init__(depth, num_classes, in_ch, width, dims=1)


class ResNet2D(ResNet):
    """`ResNet` with 2-D convs for images (N, `in_ch`, H, W): 8×8 digits, 28×28 images, 32×32 CIFAR."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_ch: int = 3, width: int = 16) -> None:
        super().__init__(depth, num_classes, in_ch, width, dims=2)


def resnet20_1d(num_classes: int = 11, in_ch: int = 2, width: int = 16) -> ResNet1D:
    return ResNet1D(20, num_classes, in_ch, width)


def resnet56_1d(num_classes: int = 11, in_ch: int = 2, width: int = 16) -> ResNet1D:
    return ResNet1D(56, num_classes, in_ch, width)


def resnet20(num_classes: int = 10, in_ch: int = 3, width: int = 16) -> ResNet2D:
    return ResNet2D(20, num_classes, in_ch, width)


def resnet56(num_classes: int = 10, in_ch: int = 3, width: int = 16) -> ResNet2D:
    return ResNet2D(56, num_classes, in_ch, width)


VGG_SMALL: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, "M")


class VGGBN(nn.Module):
    """VGG-style net (Simonyan & Zisserman 2015) with BN: `cfg` lists conv3-BN-ReLU widths, "M" a 2× max pool.

    head="pool": global average pool → linear (any input size); head="flatten": flatten → linear, which
    needs `input_size` (L, or H = W) divisible by 2**(number of "M"): the linear's width depends on it.
    Input (N, `in_ch`, L) or (N, `in_ch`, H, W); output (N, `num_classes`)."""

    def __init__(self, cfg: Sequence[int | str] = VGG_SMALL, in_ch: int = 3, num_classes: int = 10, dims: int = 2,
                 head: str = "pool", input_size: int | None = None) -> None:
        super().__init__()
        _check_dims(dims)
        layers: list[nn.Module] = []
        cin, pools = in_ch, 0
        for v in cfg:
            if v == "M":
                layers.append(_MAXPOOL[dims](2))
                pools += 1
            else:
                layers += [conv_bn(cin, int(v), 3, dims), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        if head == "pool":
            self.classifier = nn.Sequential(_GAP[dims](1), nn.Flatten(), nn.Linear(cin, num_classes))
        elif head == "flatten":
            if input_size is None or input_size % 2**pools:
                raise ValueError(f"head='flatten' needs input_size divisible by {2**pools}, got {input_size}")
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * (input_size >> pools) ** dims, num_classes))
        else:
            raise ValueError(f"head must be 'pool' or 'flatten', got {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1×1 expand (×`expand`) - BN - ReLU6, depthwise 3×3
    (stride) - BN - ReLU6, 1×1 project - BN with no activation (the linear bottleneck); the input is added
    back when the block keeps the shape. expand=1 skips the expansion conv, as in the paper's first block."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dims: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [conv_bn(cin, hidden, 1, dims), nn.ReLU6()]
        layers += [conv_bn(hidden, hidden, 3, dims, stride=stride, groups=hidden), nn.ReLU6(),
                   conv_bn(hidden, cout, 1, dims)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `self.residual` is a constructor constant, so fx records one fixed branch.
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper's Table 2, shrunk.
MBV2_SMALL: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2: conv3-BN-ReLU6 stem (`stem` channels), inverted-residual stages from `cfg`,
    1×1 conv-BN-ReLU6 to `last` channels, global average pool, linear. Input (N, `in_ch`, L) or
    (N, `in_ch`, H, W) of any size ≥ 1 (padding and the global pool keep it valid; the default cfg has two
    stride-2 stages: 32×32 → 8×8, 2×128 I/Q in 1-D → 32); output (N, `num_classes`)."""

    def __init__(self, num_classes: int = 10, in_ch: int = 3, dims: int = 2, stem: int = 16, last: int = 128,
                 cfg: Sequence[tuple[int, int, int, int]] = MBV2_SMALL) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_ch, stem, 3, _check_dims(dims)), nn.ReLU6())
        blocks, cin = [], stem
        for t, c, n, s in cfg:
            for j in range(n):
                blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t, dims))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(conv_bn(cin, last, 1, dims), nn.ReLU6(), _GAP[dims](1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


class DenseLayer(nn.Module):
    """DenseNet-BC layer (Huang et al. 2017, §3): BN-ReLU-conv1×1(4·growth)-BN-ReLU-conv3(growth); its
    output is concatenated to its input, so every later layer sees every earlier layer's channels."""

    def __init__(self, cin: int, growth: int, dims: int) -> None:
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        self.body = nn.Sequential(bn(cin), nn.ReLU(), conv(cin, 4 * growth, 1, bias=False),
                                  bn(4 * growth), nn.ReLU(), conv(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Sequential):
    """DenseNet transition: BN-ReLU-conv1×1 (compresses the channels) - 2× average pool."""

    def __init__(self, cin: int, cout: int, dims: int) -> None:
        super().__init__(_BN[dims](cin), nn.ReLU(), _CONV[dims](cin, cout, 1, bias=False), _AVGPOOL[dims](2))


class DenseNetSmall(nn.Module):
    """A small DenseNet-BC: conv3 stem (2·`growth` channels), dense blocks of `layers[i]` DenseLayers joined
    by transitions that keep ⌊`compression`·C⌋ channels and halve the size, then BN-ReLU, global average
    pool, linear. Input (N, `in_ch`, L) or (N, `in_ch`, H, W) with each size ≥ 2**(len(layers)-1)
    (8×8 digits and 28×28 images work, 2×128 I/Q in 1-D too); output (N, `num_classes`)."""

    def __init__(self, num_classes: int = 10, in_ch: int = 3, dims: int = 2, growth: int = 12,
                 layers: Sequence[int] = (4, 4, 4), compression: float = 0.5) -> None:
        super().__init__()
        c = 2 * growth
        mods: list[nn.Module] = [_CONV[_check_dims(dims)](in_ch, c, 3, padding=1, bias=False)]
        for i, n in enumerate(layers):
            for _ in range(n):
                mods.append(DenseLayer(c, growth, dims))
                c += growth
            if i < len(layers) - 1:
                mods.append(Transition(c, int(compression * c), dims))
                c = int(compression * c)
        mods += [_BN[dims](c), nn.ReLU(), _GAP[dims](1), nn.Flatten()]
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _c4net(**kwargs) -> nn.Module:
    from fxslim.zoo.e2 import C4Net  # lazy: importing e2cnn costs seconds and only this model needs it

    return C4Net(**kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_resnet": DigitsResNet,
    "cnn1d": CNN1D,
    "resnet20_1d": resnet20_1d,
    "resnet56_1d": resnet56_1d,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg_bn": VGGBN,
    "mobilenetv2_small": MobileNetV2Small,
    "densenet_small": DenseNetSmall,
    "c4net": _c4net,
}


def build(name: str, **kwargs) -> nn.Module:
    """The zoo model `name` built with `kwargs` (see each class for its arguments and input sizes)."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
