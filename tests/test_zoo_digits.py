"""The digits dataset and DigitsResNet of the zoo."""

from __future__ import annotations

import torch
from torch import fx

import fxslim
from fxslim.zoo.data import digits_loaders
from fxslim.zoo.models import DigitsResNet


def test_loaders_are_a_seeded_80_20_split_of_scaled_images():
    train, test = digits_loaders(batch_size=64, seed=0)
    n_train, n_test = sum(len(y) for _, y in train), sum(len(y) for _, y in test)
    assert (n_train, n_test) == (1437, 360)  # 1,797 images, int(0.8 * 1797) for training
    assert len(train) == 23 and len(test) == 6
    x, y = train[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (64,) and y.dtype == torch.int64
    xs = torch.cat([b[0] for b in train + test])
    assert xs.min() == 0 and xs.max() == 1
    assert set(torch.cat([b[1] for b in train]).tolist()) == set(range(10))
    again, _ = digits_loaders(batch_size=64, seed=0)
    assert torch.equal(again[0][0], x)
    other, _ = digits_loaders(batch_size=64, seed=1)
    assert not torch.equal(other[0][0], x)


def test_digits_resnet_traces_and_matches_eager():
    torch.manual_seed(0)
    model = DigitsResNet().eval()
    x = torch.rand(3, 1, 8, 8)
    gm = fxslim.trace(model, (x,))
    assert isinstance(gm, fx.GraphModule)
    assert torch.allclose(gm(x), model(x))
    assert model(x).shape == (3, 10)
    assert fx.symbolic_trace(model)(x).shape == (3, 10)  # plain fx too: no leaf modules needed
    assert fxslim.count(model, (x[:1],)).params == 77_290


def test_digits_resnet_couples_stem_and_first_block_channels():
    dg = fxslim.analyze(DigitsResNet(), (torch.rand(1, 1, 8, 8),))
    assert [g.size for g in dg.prunable_groups] == [32, 32, 64, 64]
    assert dg.group_of("stem_0") is dg.group_of("layer1_conv2")  # identity shortcut ties them
    assert dg.group_of("layer2_conv2") is dg.group_of("layer2_downsample_0")  # so does the projection
    assert not dg.unsupported
