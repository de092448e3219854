"""The model zoo: every model runs, traces, analyses, prunes and exports; the C4 e2cnn net is invariant
under rot90, and its plain-torch export computes the same logits and traces with fxslim."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import fx, nn

import fxslim
from fxslim.zoo import models as zoo
from fxslim.zoo.randnet import randomize_bn

# (registry name, small constructor kwargs, input shape): widths kept tiny so the whole file stays fast.
CASES = [
    ("digits_resnet", dict(width=8), (2, 1, 8, 8)),
    ("cnn1d", dict(width=8, hidden=16, length=64), (2, 2, 64)),
    ("resnet20_1d", dict(width=4), (2, 2, 32)),
    ("resnet56_1d", dict(width=4), (2, 2, 32)),
    ("resnet20", dict(in_ch=1, width=4), (2, 1, 8, 8)),
    ("resnet56", dict(in_ch=1, width=4), (2, 1, 8, 8)),
    ("vgg_bn", dict(cfg=(8, "M", 16, 16, "M"), in_ch=1), (2, 1, 8, 8)),
    ("vgg_bn", dict(cfg=(8, "M", 16, "M"), in_ch=2, num_classes=11, dims=1, head="flatten", input_size=32),
     (2, 2, 32)),
    ("mobilenetv2_small", dict(in_ch=1, stem=8, last=16, cfg=((1, 8, 1, 1), (2, 12, 2, 2), (2, 16, 1, 1))),
     (2, 1, 8, 8)),
    ("mobilenetv2_small", dict(in_ch=2, num_classes=11, dims=1, stem=8, last=16, cfg=((2, 8, 2, 2),)),
     (2, 2, 32)),
    ("densenet_small", dict(in_ch=1, growth=4, layers=(2, 2)), (2, 1, 8, 8)),
    ("densenet_small", dict(in_ch=2, num_classes=11, dims=1, growth=4, layers=(2, 2)), (2, 2, 32)),
]
DEEP_TWINS = ("resnet56", "resnet56_1d")
IDS = [f"{name}-{len(shape) - 2}d" + ("-flatten" if kw.get("head") == "flatten" else "") for name, kw, shape in CASES]


def _model_and_input(name: str, kwargs: dict, shape: tuple) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(zoo.build(name, **kwargs)).eval()
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_cases_cover_every_plain_registry_model():
    # c4net is e2cnn-based and has its own tests below.
    assert {name for name, _, _ in CASES} == set(zoo.MODELS) - {"c4net"}


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=IDS)
def test_zoo_model_traces_analyses_prunes_and_exports(name, kwargs, shape, tmp_path):
    model, x = _model_and_input(name, kwargs, shape)
    classes = kwargs.get("num_classes", 11 if name in ("cnn1d", "resnet20_1d", "resnet56_1d") else 10)
    y = model(x)
    assert y.shape == (shape[0], classes)
    gm = fxslim.trace(model, (x,))
    torch.testing.assert_close(gm(x), y, atol=1e-6, rtol=0)
    dg = fxslim.analyze(gm, (x,))
    assert dg.unsupported == [], dg.summary()
    assert len(dg.prunable_groups) >= 1
    if name in DEEP_TWINS:
        return  # the same classes as resnet20/resnet20_1d, only more blocks: pruning/export add ~10 s, no coverage
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
    assert res.module(x).shape == y.shape
    assert res.report[-1].params_after < res.report[0].params_before
    assert fxslim.export_onnx(model, (x,), tmp_path / "m.onnx") < 1e-4


def test_cnn1d_flatten_head_is_sliced_per_kept_channel():
    """flatten(C×L) → linear: pruning a channel must remove its L input columns of the linear, together."""
    model, x = _model_and_input("cnn1d", dict(width=8, hidden=16, length=64), (2, 2, 64))
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": 0.5}])
    last_conv = [m for m in res.module.modules() if isinstance(m, nn.Conv1d)][-1]
    assert last_conv.out_channels < 8
    assert res.module.get_submodule("classifier.1").in_features == last_conv.out_channels * (64 >> 4)


@pytest.mark.parametrize(("factory", "in_ch", "params"), [(zoo.resnet20, 3, 272_474), (zoo.resnet56, 3, 855_770)])
def test_cifar_resnet_parameter_counts(factory, in_ch, params):
    # He et al. 2016 Table 6: 0.27M / 0.85M with identity (option A) shortcuts, i.e. 269,722 / 853,018; our
    # 1×1 conv+BN projections at the two stage entries add 16·32 + 2·32 + 32·64 + 2·64 = 2,752.
    model = factory(in_ch=in_ch)
    assert sum(p.numel() for p in model.parameters()) == params
    n = (20 if factory is zoo.resnet20 else 56) - 2
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n + 1 + 2  # + stem + 2 projections


def test_resnet1d_mirrors_resnet2d():
    one, two = zoo.resnet20_1d(num_classes=10, in_ch=3), zoo.resnet20(in_ch=3)
    kinds = [type(m).__name__.replace("1d", "2d") for m in one.modules()]
    assert kinds[1:] == [type(m).__name__ for m in two.modules()][1:]  # same layers, 1-D flavour
    assert one(torch.randn(2, 3, 128)).shape == (2, 10)


def test_mobilenet_adds_the_input_back_exactly_where_shapes_match():
    model = zoo.MobileNetV2Small()
    adds = [n for n in fxslim.trace(model).graph.nodes if n.target is operator.add]
    blocks = list(model.blocks)
    assert len(adds) == sum(b.residual for b in blocks) == 4
    assert [b.residual for b in blocks] == [True, False, True, False, True, False, True]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_densenet_concatenates_every_layer_and_compresses_at_transitions():
    model = zoo.DenseNetSmall(growth=4, layers=(2, 3))
    cats = [n for n in fxslim.trace(model).graph.nodes if n.target is torch.cat]
    assert len(cats) == 5
    # stem 8 → +2·4 = 16 → transition 8 → +3·4 = 20 channels into the classifier
    assert model.features[3][2].out_channels == 8 and model.fc.in_features == 20


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown zoo model 'resnet21'.*resnet20"):
        zoo.build("resnet21")
    with pytest.raises(ValueError, match="6n\\+2"):
        zoo.ResNet1D(depth=21)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 16"):
        zoo.CNN1D(length=100)
    with pytest.raises(ValueError, match="dims must be 1"):
        zoo.VGGBN(dims=3)
    with pytest.raises(ValueError, match="input_size divisible"):
        zoo.VGGBN(head="flatten")


# ---- C4-equivariant e2cnn model -------------------------------------------------------------------------------

C4_KW = dict(fields=(2, 4, 8), hidden=16)


@pytest.fixture(scope="module")
def c4():
    """A small C4Net with non-trivial BN statistics (train-mode batches, then random affine/stats), in eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e2cnn 0.2.3 indexes with uint8 masks (a torch deprecation warning)
        from fxslim.zoo import e2
    torch.manual_seed(0)
    model = zoo.build("c4net", **C4_KW)
    assert isinstance(model, e2.C4Net)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 1, 28, 28))
    # randomize_bn reaches the per-field BatchNorm3d inside each InnerBatchNorm: the stats stay per field.
    randomize_bn(model, seed=3).eval()
    return e2, model, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def _rot_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x)
        return max((model(torch.rot90(x, k, (2, 3))) - y).abs().max().item() for k in (1, 2, 3))


def test_c4net_is_rotation_invariant(c4):
    _, model, x = c4
    assert model(x).shape == (3, 10)
    assert _rot_error(model, x) < 1e-4


def test_c4net_export_is_exact_invariant_and_traces(c4):
    e2, model, x = c4
    plain = e2.export_plain(model)
    assert not any(type(m).__module__.startswith("e2cnn") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    assert _rot_error(plain, x) < 1e-4
    gm = fxslim.trace(plain, (x,))
    torch.testing.assert_close(gm(x), plain(x), atol=0, rtol=0)
    assert gm.meta["group"] == "C4" and gm.meta["field_layout"] == e2.field_layout(model)
    assert fx.symbolic_trace(plain)(x).shape == (3, 10)
    dg = fxslim.analyze(plain, (x,))
    assert dg.unsupported == [] and dg.prunable_groups


def test_c4net_export_leaves_the_model_untouched(c4):
    e2, model, x = c4
    model.train()
    try:
        plain = e2.export_plain(model)
        assert model.training and all(m.training for m in model.modules())  # export() had switched to eval
    finally:
        model.eval()
    before = model(x)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)  # shares nothing: editing the twin must not move the e2cnn model
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_c4net_field_layout_lists_fields_of_four_channels(c4):
    e2, model, _ = c4
    layout = e2.field_layout(model)
    assert [(f.layer, f.fields, f.field_size, f.in_fields, f.in_field_size) for f in layout] == [
        ("features.0", 2, 4, 1, 1), ("features.3", 4, 4, 2, 4), ("features.7", 8, 4, 4, 4)]
    plain = e2.export_plain(model)
    for f in layout:  # the twin's conv of the same name has fields × field_size channels
        conv = plain.get_submodule(f.layer)
        assert (conv.out_channels, conv.in_channels) == (f.fields * f.field_size, f.in_fields * f.in_field_size)


def test_group_max_pool_matches_e2cnn_group_pooling(c4):
    e2, model, _ = c4
    from e2cnn.nn import GeometricTensor, MaxPoolChannels

    z = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(e2.GroupMaxPool(4)(z), MaxPoolChannels(4)(z), atol=0, rtol=0)
    expected = model.gpool(GeometricTensor(z, model.gpool.in_type)).tensor
    torch.testing.assert_close(e2.GroupMaxPool(4)(z), expected, atol=0, rtol=0)


def test_c4net_input_size_rule(c4):
    """An odd size into the 2×2 pool drops a different row per rotation (docs/notes/facts.md)."""
    e2, model, _ = c4
    x29 = torch.randn(3, 1, 29, 29, generator=torch.Generator().manual_seed(4))
    assert _rot_error(e2.export_plain(model), x29) > 1e-3
