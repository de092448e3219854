"""Random architectures for property tests and coverage checks: a `RandomNet` is built from a list of block
names and widths, so hypothesis (or a seeded RNG) can generate many nets that exercise every coupling the
analyzer knows: residual adds (and adds of adds), concat, split/chunk, slicing, grouped and depthwise
convs, squeeze-excitation gates, channel shuffle, flatten→linear, in 1-D and 2-D. Every net is
fx-traceable (the block list is fixed at construction) and uses BatchNorm as its only normalisation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

BLOCKS = ("conv", "res", "res3", "proj", "dense", "chunk", "slice", "group", "dw", "se", "shuffle")
HEADS = ("gap", "flatten")


@dataclass(frozen=True)
class Spec:
    dims: int  # 1 or 2
    in_ch: int
    size: int  # input length (1-D) or height = width (2-D)
    stem: int  # stem width (a multiple of 4)
    blocks: tuple[tuple[str, int], ...]  # (block name, width parameter: a multiple of 4)
    head: str = "gap"
    classes: int = 5

    def example_input(self, batch: int = 2) -> torch.Tensor:
        shape = (batch, self.in_ch) + (self.size,) * self.dims
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def random_spec(rng: random.Random, dims: int | None = None, n_blocks: int = 4) -> Spec:
    """A seeded random Spec (the hypothesis strategy in the tests draws the same fields)."""
    dims = dims or rng.choice((1, 2))
    blocks = tuple((rng.choice(BLOCKS), rng.choice((4, 8, 12))) for _ in range(n_blocks))
    return Spec(dims, rng.choice((1, 3)), 8, rng.choice((8, 12, 16)), blocks, rng.choice(HEADS))


def _layers(dims: int):
    return (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)


class ConvBN(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, k: int = 3, groups: int = 1, relu: bool = True):
        super().__init__()
        conv, bn = _layers(dims)
        self.conv = conv(cin, cout, k, padding=k // 2, groups=groups)
        self.bn = bn(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


class Block(nn.Module):
    """One block of a RandomNet; `kind` picks the coupling it exercises."""

    def __init__(self, dims: int, kind: str, c: int, w: int):
        super().__init__()
        self.kind, self.dims = kind, dims
        if kind == "conv":
            self.a = ConvBN(dims, c, w)
            self.out = w
        elif kind in ("res", "res3"):
            self.a = ConvBN(dims, c, c)
            self.b = ConvBN(dims, c, c, relu=False)
            if kind == "res3":  # an add of adds: x + f(x) + g(x)
                self.c = ConvBN(dims, c, c, k=1, relu=False)
            self.out = c
        elif kind == "proj":
            self.a = ConvBN(dims, c, w)
            self.b = ConvBN(dims, w, w, relu=False)
            self.p = ConvBN(dims, c, w, k=1, relu=False)
            self.out = w
        elif kind == "dense":
            self.a = ConvBN(dims, c, w)
            self.out = c + w
        elif kind == "chunk":
            self.a = ConvBN(dims, c // 2, c // 2)
            self.b = ConvBN(dims, c - c // 2, w)
            self.out = c // 2 + w
        elif kind == "slice":
            self.k = c // 4
            self.a = ConvBN(dims, self.k, w)
            self.out = w + c - self.k
        elif kind == "group":
            self.a = ConvBN(dims, c, c * 2, groups=4)
            self.out = c * 2
        elif kind == "dw":
            self.a = ConvBN(dims, c, c, groups=c)
            self.b = ConvBN(dims, c, w, k=1)
            self.out = w
        elif kind == "se":
            conv, _ = _layers(dims)
            self.fc1 = conv(c, max(c // 4, 2), 1)
            self.fc2 = conv(max(c // 4, 2), c, 1)
            self.out = c
        elif kind == "shuffle":
            self.a = ConvBN(dims, c, c, k=1)
            self.out = c
        else:
            raise ValueError(f"unknown block {kind!r}; valid: {BLOCKS}")

    def forward(self, x):
        k = self.kind
        if k == "conv":
            return self.a(x)
        if k == "res":
            return torch.relu(x + self.b(self.a(x)))
        if k == "res3":
            return torch.relu(x + self.b(self.a(x)) + self.c(x))
        if k == "proj":
            return torch.relu(self.p(x) + self.b(self.a(x)))
        if k == "dense":
            return torch.cat([x, self.a(x)], 1)
        if k == "chunk":
            h = x.shape[1] // 2
            a, b = torch.split(x, [h, x.shape[1] - h], dim=1)
            return torch.cat([self.a(a), self.b(b)], 1)
        if k == "slice":
            return torch.cat([self.a(x[:, : self.k]), x[:, self.k :]], 1)
        if k == "group":
            return self.a(x)
        if k == "dw":
            return self.b(self.a(x))
        if k == "se":
            s = x.mean(tuple(range(2, 2 + self.dims)), keepdim=True)
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        # shuffle: conv, then channel shuffle with 2 groups (view / transpose / view)
        y = self.a(x)
        n, c = y.shape[0], y.shape[1]
        return y.view(n, 2, c // 2, -1).transpose(1, 2).reshape(y.shape)


class RandomNet(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.stem = ConvBN(spec.dims, spec.in_ch, spec.stem)
        blocks, c = [], spec.stem
        for kind, w in spec.blocks:
            if kind in ("group", "chunk", "shuffle") and c % 4:
                kind = "conv"  # keep widths divisible where the block needs it
            blocks.append(Block(spec.dims, kind, c, w))
            c = blocks[-1].out
        self.blocks = nn.Sequential(*blocks)
        self.width = c
        pool = nn.AdaptiveAvgPool1d if spec.dims == 1 else nn.AdaptiveAvgPool2d
        if spec.head == "flatten":  # flatten -> linear: a channel owns `2**dims` input features
            self.pool = pool(2)
            self.fc1 = nn.Linear(c * 2**spec.dims, 16)
        else:
            self.pool = pool(1)
            self.fc1 = nn.Linear(c, 16)
        self.fc2 = nn.Linear(16, spec.classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights (fresh BNs hide bugs: γ=1, μ=0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model
