"""Small models for tests, the demo and tools: each one trains in seconds on a CPU, traces with plain
torch.fx (no leaf modules needed) and exercises the structures the passes must handle (BatchNorm to fold,
residual adds that couple channels, a strided 1×1 projection). This file only defines models; it never
trains, loads weights or downloads anything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, else a strided 1×1 conv + BN projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

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
