"""lowrank_conv / lowrank_linear with reconstruct=True: the last layer of each chain re-fit by least squares
to the original layer's output (fxslim.reconstruct.refit_outputs_)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxslim
from fxslim import linalg
from fxslim.pass_api import PassContext
from fxslim.passes import lowrank_conv, lowrank_linear
from fxslim.passes.lowrank_conv import TuckerConv
from fxslim.reconstruct import refit_outputs_
from fxslim.rewrite import replace_modules
from tests.passes.test_lowrank_conv import _setup
from tests.passes.test_lowrank_linear import _low_rank_mlp


def _output_error(model: nn.Module, new: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((new(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("dims", [1, 2])
def test_a_spoilt_last_factor_is_recovered_exactly_when_the_chain_spans_the_original(dims):
    """At full rank the first factors of a Tucker chain span the conv's input patches: whatever the last 1×1
    holds, least squares finds the weights that reproduce the original output."""
    model, gm, data, x = _setup(dims)
    with torch.no_grad():
        h = torch.relu(model.bn(model.a(x)))
        out_shape = tuple(model.b(h).shape[1:])
        fac = TuckerConv(model.b, tuple(h.shape[1:]), out_shape)
    new = replace_modules(gm, {"b": fac.chain(fac.full)}, (x,), inline=True)
    last = new.get_submodule("b")[-1]
    with torch.no_grad():
        last.weight.normal_()
        last.bias.normal_()
    held_out = torch.cat([b[0] for b in data])[64:]
    assert _output_error(model, new, held_out) > 0.1
    ends = {n.name: "b" for n in new.graph.nodes if n.op == "call_module" and n.target == "b.2"}
    (rec,) = refit_outputs_(new, gm, ends, data[:2], ridge=0.0)  # unregularised: the exact solution
    assert rec["layer"] == "b.2" and rec["samples"] == 64 * min(16, math.prod(out_shape[1:]))  # positions per image
    assert rec["rel_error_after"] < 1e-4 < 0.1 < rec["rel_error_before"]
    assert _output_error(model, new, held_out) < 1e-4


@pytest.mark.parametrize("method", ["tucker", "cp", "tt"])
def test_reconstruct_brings_every_chain_and_the_model_closer_to_the_original(method):
    model, gm, data, x = _setup(2, seed=3)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    ctx = PassContext(example_inputs=(x,), data=data)
    opts = dict(method=method, similarity=0.8, calib_samples=64, cp_iterations=10)
    plain = lowrank_conv.run(gm, ctx, **opts)
    refit = lowrank_conv.run(gm, ctx, reconstruct=True, calib_batches=2, **opts)
    assert [r["k"] for r in refit.record["layers"]] == [r["k"] for r in plain.record["layers"]]
    recs = refit.record["reconstructed"]
    assert {r["layer"].rsplit(".", 1)[0] for r in recs} == {r["target"] for r in refit.record["layers"]}
    for r in recs:
        assert r["rel_error_after"] <= r["rel_error_before"] + 1e-9
    assert refit.record["reconstruct_seconds"] > 0
    calib = torch.cat([b[0] for b in data])
    assert _output_error(model, refit.module, calib) < _output_error(model, plain.module, calib)
    assert linalg.cosine_similarity(model(calib), refit.module(calib)) > linalg.cosine_similarity(
        model(calib), plain.module(calib)
    )
    for k, v in gm.state_dict().items():  # the input model is not written through
        assert torch.equal(v, before[k])


def test_linear_svd_chains_are_refit_and_tt_chains_are_skipped_with_a_reason():
    model = _low_rank_mlp()
    data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    x = data[0][0][:4]
    gm = fxslim.trace(model)
    ctx = PassContext(example_inputs=(x,), data=data)
    svd = lowrank_linear.run(gm, ctx, method="svd", rank=4, reconstruct=True, calib_batches=3)
    recs = {r["layer"]: r for r in svd.record["reconstructed"]}
    assert set(recs) == {f"{r['target']}.1" for r in svd.record["layers"]}
    assert all(r["rel_error_after"] <= r["rel_error_before"] + 1e-9 for r in recs.values())
    plain = lowrank_linear.run(gm, ctx, method="svd", rank=4)
    calib = torch.cat([b[0] for b in data])
    assert _output_error(model, svd.module, calib) < _output_error(model, plain.module, calib)
    tt = lowrank_linear.run(gm, ctx, method="tt", rank=2, reconstruct=True)
    assert tt.record["reconstructed"] and all(
        "TTLinearModule is not a sequence of layers" in r["skipped"] for r in tt.record["reconstructed"]
    )


def test_reconstruct_needs_data_and_a_valid_batch_count():
    _, gm, data, x = _setup(2)
    with pytest.raises(fxslim.PassError, match="lowrank_conv"):
        lowrank_conv.run(gm, PassContext(example_inputs=(x,)), rank=0.5, reconstruct=True)
    with pytest.raises(fxslim.RecipeError, match="lowrank_conv.*calib_batches=0"):
        lowrank_conv.run(gm, PassContext(example_inputs=(x,), data=data), rank=0.5, reconstruct=True, calib_batches=0)
