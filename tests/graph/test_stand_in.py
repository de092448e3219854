"""Conv/linear stand-ins in shape propagation: every node's metadata equals the plain run's, the stand-in is
refused where torch could answer differently, and a value-dependent shape after a stand-in falls back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

import fxslim
from fxslim.errors import AnalysisError
from fxslim.graph import stand_in
from fxslim.graph.shape import propagate, tensor_metadata
from fxslim.zoo.randnet import BLOCKS, HEADS, RandomNet, Spec, randomize_bn

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _metas(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: repr(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


def _both(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict, fx.GraphModule]:
    gm = fxslim.trace(model)
    propagate(gm, (x,), stand_ins=False)
    plain = _metas(gm)
    propagate(gm, (x,))
    return plain, _metas(gm), gm


@st.composite
def conv_cases(draw):
    n = draw(st.sampled_from((1, 2, 3)))
    groups = draw(st.sampled_from((1, 2, 4)))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    padding = draw(st.sampled_from(("valid", "same", 0, 1, 2)))
    stride = 1 if padding == "same" else draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    reach = dilation * (k - 1) + 1
    size = draw(st.integers(reach, reach + (4 if n < 3 else 2)))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1](cin, cout, k, stride=stride, padding=padding,
                                                     dilation=dilation, groups=groups, bias=draw(st.booleans()))
    batched = draw(st.booleans())
    shape = ((draw(st.integers(1, 2)),) if batched else ()) + (cin,) + (size,) * n
    return conv, shape, draw(st.booleans())


@SETTINGS
@given(case=conv_cases(), seed=st.integers(0, 3))
def test_conv_stand_in_has_the_real_outputs_metadata(case, seed):
    """Row-major inputs get a stand-in equal to the real output in every metadata field; inputs laid out
    channels-last (the channel dim moved last, then back) get one only where that is still true."""
    conv, shape, channels_last = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        c = x.dim() - len(conv.kernel_size) - 1
        order = [*range(c), *range(c + 1, x.dim()), c]
        x = x.permute(order).contiguous().permute([order.index(i) for i in range(x.dim())])
    with torch.no_grad():
        want = conv(x)
    got = stand_in.output_of(conv, (x,), {})
    assert got is not None or channels_last
    if got is not None:
        assert tensor_metadata(got) == tensor_metadata(want)
        assert not got.any()


@SETTINGS
@given(lead=st.lists(st.integers(1, 3), max_size=3), fin=st.integers(1, 6), fout=st.integers(1, 6),
       bias=st.booleans())
def test_linear_stand_in_has_the_real_outputs_metadata(lead, fin, fout, bias):
    lin = nn.Linear(fin, fout, bias=bias)
    x = torch.randn(*lead, fin)
    with torch.no_grad():
        want = lin(x)
    got = stand_in.output_of(lin, (x,), {})
    assert tensor_metadata(got) == tensor_metadata(want)


def test_stand_in_is_refused_where_the_layer_must_run():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    assert stand_in.output_of(conv, (torch.randn(1, 5, 8, 8),), {}) is None  # channels do not fit
    assert stand_in.output_of(conv, (x.to(memory_format=torch.channels_last),), {}) is None
    assert stand_in.output_of(conv, (x.double(),), {}) is None  # dtype differs from the weight's
    assert stand_in.output_of(conv, (torch.randn(1, 4, 1, 1),), {}) is not None
    # contiguous in both layouts, strides spelling channels-last: torch's conv keeps that layout
    assert stand_in.output_of(conv, (torch.randn(1, 1, 1, 4).permute(0, 3, 1, 2),), {}) is None
    assert stand_in.output_of(nn.Linear(4, 3), (torch.randn(1, 1, 4, 1).permute(0, 1, 3, 2),), {}) is None
    assert stand_in.output_of(nn.Conv2d(4, 6, 3), (torch.randn(1, 4, 2, 2),), {}) is None  # empty output
    assert stand_in.output_of(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (x,), {}) is None
    handle = conv.register_forward_hook(lambda m, i, o: o)
    assert stand_in.output_of(conv, (x,), {}) is None
    handle.remove()
    assert stand_in.output_of(conv, (x,), {}) is not None
    assert stand_in.output_of(nn.Linear(4, 3), (torch.randn(2, 5),), {}) is None


randnet_specs = st.builds(
    Spec,
    dims=st.sampled_from((1, 2)),
    in_ch=st.sampled_from((1, 3)),
    size=st.just(8),
    stem=st.sampled_from((8, 12)),
    blocks=st.lists(st.tuples(st.sampled_from(BLOCKS), st.sampled_from((4, 8))), min_size=1, max_size=4)
    .map(tuple),
    head=st.sampled_from(HEADS),
)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=randnet_specs)
def test_random_nets_get_the_plain_runs_metadata(spec):
    torch.manual_seed(0)
    model = randomize_bn(RandomNet(spec), 0).eval()
    plain, fast, _ = _both(model, spec.example_input())
    assert fast == plain


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet18", 32),
        ("mobilenet_v3_small", 32),
        ("convnext_tiny", 32),
        ("swin_t", 32),
        pytest.param("densenet121", 32, marks=pytest.mark.slow),
        pytest.param("vit_b_32", 32, marks=pytest.mark.slow),
    ],
)
def test_torchvision_models_get_the_plain_runs_metadata(name, size):
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    plain, fast, gm = _both(model, torch.randn(1, 3, size, size))
    assert fast == plain
    assert stand_in.graph_allows(gm, dict(gm.named_modules()))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)


def _graph(body):
    """A traced model running `body(conv_output)` after a conv."""
    model = type("Probe", (_Conv,), {"forward": lambda self, x: body(self.conv(x))})()
    return model.eval()


# Each makes a shape (or success) depend on the conv's values, which a zero stand-in would change.
VALUE_SHAPED = {
    "mask": lambda y: y[y > 0],
    "list index": lambda y: y[[y > 0]],
    "nonzero": lambda y: torch.nonzero(y > 0),
    "aten nonzero": lambda y: torch.ops.aten.nonzero.default(y > 0),
    "where(condition=)": lambda y: torch.where(condition=y > 0),
    "slice by a count": lambda y: y.flatten()[: (y > 0).sum()],
    "narrow by a count": lambda y: y.flatten().narrow(0, 0, (y > 0).sum()),
    "arange of a count": lambda y: torch.arange((y > 0).sum()),
    "zeros of a count": lambda y: torch.zeros((y > 0).sum()),
    "new_zeros of a count": lambda y: y.new_zeros((y > 0).sum()),
    "pad by a count": lambda y: F.pad(y, [(y > 0).sum(), 0]),
    "one_hot": lambda y: F.one_hot(y.argmax(1)),
    "sparse values": lambda y: y.relu().to_sparse().values(),
}


@pytest.mark.parametrize("name", list(VALUE_SHAPED))
def test_value_dependent_shapes_after_a_conv_come_out_as_the_plain_run(name):
    model = _graph(VALUE_SHAPED[name])
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    want = want[0] if isinstance(want, tuple) else want
    assert 0 < want.shape[0] < 144 or name == "one_hot"  # the zero stand-in would give 0 (or 1 class)
    plain, fast, gm = _both(model, x)
    assert fast == plain
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    meta = out.meta["tensor_meta"]
    assert tuple((meta if isinstance(meta, TensorMetadata) else meta[0]).shape) == tuple(want.shape)


def keep_positive(y):  # a user function fx keeps opaque: it may read values
    return y[y > 0]


fx.wrap("keep_positive")


def test_an_opaque_user_function_turns_stand_ins_off():
    gm = fxslim.trace(_graph(lambda y: keep_positive(y)))
    assert any(n.target is keep_positive for n in gm.graph.nodes)
    assert not stand_in.graph_allows(gm, dict(gm.named_modules()))
    plain, fast, _ = _both(_graph(lambda y: keep_positive(y)), torch.randn(1, 3, 6, 6))
    assert fast == plain


def test_an_error_the_plain_run_raises_is_still_raised():
    conv = nn.Conv2d(3, 4, 3)
    conv.bias = nn.Parameter(conv.bias.double())
    gm = fxslim.trace(nn.Sequential(conv))
    with pytest.raises(AnalysisError, match="node '_0'"):
        propagate(gm, (torch.randn(1, 3, 6, 6),))
    emb = _graph(lambda y: nn.functional.embedding((y * 100).long().abs().flatten(1), torch.zeros(4, 2)))
    with pytest.raises(AnalysisError, match="embedding"):
        propagate(fxslim.trace(emb), (torch.randn(1, 3, 6, 6),))


def test_channels_last_weights_and_instance_forwards_run_the_layer():
    x = torch.randn(2, 8, 5, 5)
    for conv in (nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 3, groups=8)):
        cl = conv.to(memory_format=torch.channels_last)
        assert cl.weight.is_contiguous()  # size-1 dims: contiguous in both layouts, strides say channels-last
        assert stand_in.output_of(cl, (x,), {}) is None
        plain, fast, _ = _both(nn.Sequential(cl).eval(), x)
        assert fast == plain
    conv = nn.Conv2d(3, 4, 3)
    conv.forward = lambda t: F.conv2d(t, conv.weight, conv.bias, padding=1)
    assert stand_in.output_of(conv, (torch.randn(1, 3, 6, 6),), {}) is None


def test_autocast_and_in_place_inputs_turn_stand_ins_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm = fxslim.trace(model)
    modules = dict(gm.named_modules())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stand_in.graph_allows(gm, modules)
    assert stand_in.graph_allows(gm, modules)

    class Shifts(_Conv):
        def forward(self, x):
            x.add_(1.0)
            y = self.conv(x)
            return y[y > 0]  # would make a run with stand-ins fall back, running add_ twice

    x = torch.zeros(1, 3, 6, 6)
    shifted = fxslim.trace(Shifts().eval())
    assert not stand_in.graph_allows(shifted, dict(shifted.named_modules()))
    propagate(shifted, (x,))
    assert torch.equal(x, torch.ones(1, 3, 6, 6))


class Opaque(nn.Module):  # a leaf of the user's: its code could branch on values
    def forward(self, x):
        return x[:, : int(x.abs().sum() > 0) + 1]


def test_a_users_leaf_module_turns_stand_ins_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Opaque()).eval()
    gm = fxslim.trace(model, leaf_modules=[Opaque])
    assert not stand_in.graph_allows(gm, dict(gm.named_modules()))
    propagate(gm, (torch.randn(1, 3, 6, 6),))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["tensor_meta"].shape) == (1, 2, 4, 4)  # a zero stand-in would have given 1 channel


def test_a_layer_that_does_not_fit_is_reported_by_torch_naming_the_node():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.b(self.a(x))

    gm = fxslim.trace(Bad())
    with pytest.raises(AnalysisError, match=r"node 'b'.*expected input\[1, 4, 4, 4\] to have 5 channels"):
        propagate(gm, (torch.randn(1, 3, 6, 6),))


def test_reuse_tells_a_run_with_stand_ins_from_a_plain_one():
    gm = fxslim.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    x = torch.randn(1, 3, 6, 6)
    propagate(gm, (x,))
    first = [n.meta["tensor_meta"] for n in gm.graph.nodes if n.op != "output"]
    propagate(gm, (x,), reuse=True)
    assert all(a is n.meta["tensor_meta"] for a, n in zip(first, gm.graph.nodes, strict=False))
    propagate(gm, (x,), reuse=True, stand_ins=False)  # asked for a plain run: not the stand-in run's record
    assert not any(a is n.meta["tensor_meta"] for a, n in zip(first, gm.graph.nodes, strict=False))
