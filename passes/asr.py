"""Pass `asr`: Adaptive Signal Resuscitation (papers/asr-2605.21426), channel-wise variance repair after
magnitude pruning, with the layer-wise repair baseline as `mode="layer"`.

On one calibration set (the first `calib_samples` samples of `ctx.data`) the dense model and the pruned model run
side by side, node by node, in eval mode. At the output of every conv/linear layer the per-channel variances
v_d (dense) and v_p (pruned, with every earlier layer already repaired) give the correction γ, which is folded
into the weights at once, so later layers are measured on the repaired signal. No op is added to the graph.

Placement (where the correction acts):
- "conv" (the paper's literal order): γ scales the layer's output rows (weight and bias), then every BatchNorm
  is re-estimated by the `bn_recalibrate` pass. A scale in front of a BN whose statistics are re-estimated is
  divided out again (only ε is left), so this placement changes nothing at layers followed by a BN.
- "bn": the BN behind the layer is re-estimated in sequence; it re-centres the pruned channel and, dividing by
  the new standard deviation, gives it the full correction γ* = sqrt(v_d / v_p). Its weight is then
  multiplied by γ / γ*, so the channel ends up with ASR's γ instead. Without shrinkage this is exactly BN-only
  recalibration; with it, channels whose signal collapsed are no longer blown up to full variance by the BN;
  layer-wise mode gives the whole layer one scale after re-centring. With recalibrate_bn=False the BN keeps
  its statistics and its weight is simply multiplied by γ.
  A layer without a BN behind it is repaired at its own output, as with "conv".

The dense model is the pruned model with the state saved by `magnitude_prune` (gm.meta) put back, or else
`ctx.reference` when it has the same structure. The calibration set runs as one batch, so `calib_samples` bounds the
memory. This file never mutates the GraphModule it is given and never edits a tensor in place."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxslim.calibrate import recalibrate_bn_
from fxslim.dense_state import DENSE_META, prunable_layers
from fxslim.errors import PassError
from fxslim.graph.clone import clone_gm
from fxslim.module_state import eval_mode
from fxslim.modules import ChannelAffine
from fxslim.options import Option, Schema, calib_samples_option, ignore_option
from fxslim.pass_api import PassContext, PassResult
from fxslim.rewrite import set_tensor
from fxslim.training import split_batch

NAME = "asr"
PLACEMENTS = ("bn", "conv")
MODES = ("channel", "layer")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Site:
    """One repaired layer: the node whose output is measured, and the BN node (if any) that applies γ."""

    layer: str  # module name of the conv/linear
    node: str  # its call node
    bn: str | None = None  # module name of the BN that carries γ ("bn" placement)
    bn_node: str | None = None


OPTIONS = Schema(
    Option("placement", str, "bn: γ through the next BatchNorm (re-estimated first); conv: into the layer's rows",
           choices=PLACEMENTS),
    Option("mode", str, "channel: one γ per output channel (ASR); layer: one γ per layer (baseline)", choices=MODES),
    Option("shrinkage", bool, "shrink each γ toward 1 by s = v_p / (v_p + λ) (channel mode)"),
    Option("lam", float, "λ of the shrinkage; None: threshold × the layer's median v_p", range=">= 0", none=True),
    Option("threshold", float, "the data-driven λ as a fraction of the layer's median variance", range=">= 0"),
    calib_samples_option("calibration samples read from data (run as one batch)", minimum=2, aliases=("samples",)),
    Option("recalibrate_bn", bool, "re-estimate the BatchNorm statistics on the calibration batches"),
    Option("fold", bool, "fold each correction into its layer or BN; false: keep a ChannelAffine op"),
    ignore_option("conv/linear module names left as they are"),
    needs_data=lambda o, gm: "the calibration samples",
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    placement: str = "bn",
    mode: str = "channel",
    shrinkage: bool = True,
    lam: float | None = None,
    threshold: float = 0.05,
    calib_samples: int = 1024,
    recalibrate_bn: bool = True,
    fold: bool = True,
    ignore: list[str] | tuple[str, ...] = (),
) -> PassResult:
    """placement: "bn" (γ applied through the following BatchNorm, which is re-estimated first) or "conv"
    (γ folded into the layer's output rows, the paper's literal order; BN re-estimated after).
    mode: "channel" (ASR: one γ per output channel) or "layer" (baseline: one γ = sqrt(mean v_d / mean v_p)).
    shrinkage: shrink each channel's γ toward 1 by s = v_p / (v_p + λ) (channel mode only).
    lam: λ; None (default) is data-driven: `threshold` × the layer's median v_p, so corrections fade to 1
    for channels whose variance is below that fraction of the median.
    calib_samples: calibration samples taken from ctx.data (run as one batch).
    recalibrate_bn: re-estimate the BatchNorm statistics on the same calibration samples.
    fold: True (default) folds every correction into the layer or BN that carries it (no op added); False
    keeps each as a ChannelAffine op right after that layer/BN (same outputs; the scales stay visible and
    removable).
    ignore: conv/linear module names left as they are.

    record: {"placement", "mode", "shrinkage", "lambda", "samples", "recalibrated", "layers": {layer:
    {"applied_at", "gamma_min", "gamma_mean", "gamma_max", "shrunk"}}, "channels": {layer: {"v_dense",
    "v_pruned", "gamma"}}, "skipped": {layer: reason}}."""
    out = clone_gm(gm)
    out.meta.pop(DENSE_META, None)  # the dense copy has done its job; the output should not carry it
    dense = dense_model(gm, ctx)
    inputs, batches = _calibration(ctx, calib_samples)
    sites, skipped = _sites(out, placement, ignore)

    with eval_mode(out), eval_mode(dense):
        v_dense = _Recorder(dense, {s.node for s in sites}).measure(*inputs)
        repair = _Repair(
            out,
            sites,
            v_dense,
            mode=mode,
            shrinkage=shrinkage,
            lam=lam,
            threshold=threshold,
            recalibrate=recalibrate_bn and placement == "bn",
        )
        repair.run(*inputs)

    if not fold:
        out = _unfold(out, repair.applied)
    record = {
        "fold": bool(fold),
        "placement": placement,
        "mode": mode,
        "shrinkage": bool(shrinkage and mode == "channel"),
        "lambda": "data" if lam is None else lam,
        "threshold": threshold,
        "samples": len(inputs[0]),
        "recalibrated": False,
        "layers": repair.summary,
        "channels": repair.channels,
        "skipped": skipped,
    }
    if recalibrate_bn:
        if placement == "conv":
            out = copy.deepcopy(out)
            recalibrate_bn_(out, ctx.data, batches=batches, momentum=None, device=ctx.device)
        record["recalibrated"] = True
    ctx.debug("asr: %s", record["layers"])
    return PassResult(out, True, record)


def dense_model(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The dense counterpart of `gm`: its own graph with the state saved by `magnitude_prune` put back, or
    `ctx.reference` when that has the same nodes and tensor shapes."""
    state = gm.meta.get(DENSE_META)
    own = gm.state_dict()
    if state is not None:
        bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        if bad:
            raise PassError(
                f"the dense state saved by magnitude_prune no longer fits the model "
                f"(a structural pass ran in between; changed: {bad[:5]}); run channel pruning before "
                "magnitude_prune"
            )
        dense = clone_gm(gm)
        for key in own:
            set_tensor(dense, key, state[key].clone())
        return dense
    ref = ctx.reference
    if ref is not None and [n.name for n in ref.graph.nodes] == [n.name for n in gm.graph.nodes]:
        theirs = ref.state_dict()
        if all(k in theirs and theirs[k].shape == v.shape for k, v in own.items()):
            return ref
    raise PassError(
        "needs the dense model: run magnitude_prune before it (it saves the dense "
        "state), or give a ctx.reference with the same structure"
    )


def channel_variance(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel variance (population) over every dim but `dim`, returned as float64."""
    dims = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.detach().var(dim=dims, unbiased=False).double()


def gamma(
    v_dense: torch.Tensor,
    v_pruned: torch.Tensor,
    *,
    mode: str = "channel",
    shrinkage: bool = True,
    lam: float | None = None,
    threshold: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, s) per channel from the dense and pruned per-channel variances (float64)."""
    if mode == "layer":
        # layer-wise repair baseline: one scalar sqrt(mean v_d / mean v_p) for every channel
        g = math.sqrt(float(v_dense.mean()) / float(v_pruned.mean())) if float(v_pruned.mean()) > 0 else 1.0
        return torch.full_like(v_dense, g), torch.ones_like(v_dense)
    alive = v_pruned > 0
    # ASR: γ*_i = sqrt(v_d,i / v_p,i) (a channel the pruning silenced completely has nothing to scale)
    g_star = torch.where(alive, torch.sqrt(v_dense / v_pruned.clamp_min(1e-300)), 1.0)
    if not shrinkage:
        return g_star, torch.ones_like(v_dense)
    if lam is None:
        lam = threshold * float(v_pruned.median())
    # ASR: s_i = v_p,i / (v_p,i + λ)
    s = torch.where(alive, v_pruned / (v_pruned + lam), 0.0) if lam > 0 else alive.double()
    return s * g_star + (1 - s), s  # ASR: γ_i = s_i γ*_i + (1 − s_i)


def _calibration(ctx: PassContext, limit: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """The first `limit` samples of ctx.data, concatenated per model input, and how many batches that took."""
    parts: list[tuple] = []
    n = 0
    for batch in ctx.require_data(NAME):
        inputs, _ = split_batch(batch)
        parts.append(inputs)
        n += len(inputs[0])
        if n >= limit:
            break
    if n < 2:
        raise PassError(f"ctx.data gave {n} samples; variances need at least 2")
    joined = tuple(torch.cat([p[i] for p in parts])[:limit].to(ctx.device) for i in range(len(parts[0])))
    return joined, len(parts)


def _sites(gm: fx.GraphModule, placement: str, ignore) -> tuple[list[Site], dict[str, str]]:
    layers = prunable_layers(gm, ignore)
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    sites, skipped = [], {}
    for name in layers:
        if len(calls[name]) > 1:
            skipped[name] = f"called at {len(calls[name])} places; one γ cannot be folded for all"
            continue
        node = calls[name][0]
        site = Site(name, node.name)
        bn = _bn_after(gm, node, calls) if placement == "bn" else None
        if bn is not None:
            site.bn, site.bn_node = str(bn.target), bn.name
        sites.append(site)
    return sites, skipped


def _bn_after(gm: fx.GraphModule, node: fx.Node, calls: dict) -> fx.Node | None:
    """The BatchNorm that is the only user of `node` (and is called only there), else None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or len(calls[str(user.target)]) != 1 or user.args[0] is not node:
        return None
    m = gm.get_submodule(user.target)
    ok = isinstance(m, _BATCHNORMS) and m.track_running_stats and m.running_var is not None
    return user if ok else None


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


class _Recorder(fx.Interpreter):
    """Runs a graph once and keeps the per-channel variance of the named nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.variances = names, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.name in self.names:
            self.variances[n.name] = channel_variance(result, _channel_dim(self.module.get_submodule(n.target)))
        return result

    def measure(self, *inputs) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.run(*inputs)
        return self.variances


class _Repair(fx.Interpreter):
    """Runs the pruned graph node by node, re-estimating BN statistics (if asked) and folding each layer's γ
    before the next layer is measured."""

    def __init__(
        self,
        gm: fx.GraphModule,
        sites: list[Site],
        v_dense: dict,
        *,
        mode: str,
        shrinkage: bool,
        lam: float | None,
        threshold: float,
        recalibrate: bool,
    ):
        super().__init__(gm)
        self.v_dense = v_dense
        self.at_layer = {s.node: s for s in sites}
        self.at_bn = {s.bn_node: s for s in sites if s.bn_node}
        self.options = {"mode": mode, "shrinkage": shrinkage, "lam": lam, "threshold": threshold}
        self.recalibrate = recalibrate
        self.pending: dict[str, tuple] = {}  # bn node -> (γ, γ*) waiting to be applied there
        self.applied: dict[str, tuple] = {}  # layer -> (node the scale acts after, how, per-channel scale, dim)
        self.summary: dict[str, dict] = {}
        self.channels: dict[str, dict] = {}

    def run(self, *inputs):
        with torch.no_grad():
            return super().run(*inputs)

    def run_node(self, n: fx.Node):
        if n.op == "call_module" and self.recalibrate:
            module = self.module.get_submodule(n.target)
            if isinstance(module, _BATCHNORMS) and module.track_running_stats and module.running_var is not None:
                self._reestimate(module, self.env[n.args[0]])
        if n.name in self.pending:
            self._apply_at_bn(self.at_bn[n.name], *self.pending.pop(n.name))
        result = super().run_node(n)
        site = self.at_layer.get(n.name)
        if site is None:
            return result
        layer = self.module.get_submodule(site.layer)
        dim = _channel_dim(layer)
        v_p = channel_variance(result, dim)
        g, s = gamma(self.v_dense[n.name], v_p, **self.options)
        self._note(site, g, s, v_p)
        # what the BN itself will do to the channel: the full correction γ* once re-estimated, else nothing
        full = gamma(self.v_dense[n.name], v_p, mode="channel", shrinkage=False)[0] if self.recalibrate else 1.0
        if site.bn_node is not None and result.dim() in (2, 3, 4, 5) and (dim == 1 or result.dim() == 2):
            self.pending[site.bn_node] = (g, full)
            return result
        _scale_rows(layer, g)
        self.applied[site.layer] = (site.node, "rows", g, dim)
        shape = [1] * result.dim()
        shape[dim] = -1
        return result * g.to(result.dtype).view(shape)

    def _reestimate(self, bn: nn.Module, x: torch.Tensor) -> None:
        """Running mean and (unbiased) variance of the BN input over the whole calibration set."""
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=True)
        bn.running_mean = mean.to(bn.running_mean.dtype)
        bn.running_var = var.to(bn.running_var.dtype)
        bn.num_batches_tracked = torch.ones_like(bn.num_batches_tracked)

    def _apply_at_bn(self, site: Site, g: torch.Tensor, g_star: torch.Tensor | float) -> None:
        """The re-estimated BN gives the channel its full correction γ*; weight · γ / γ* gives it γ instead
        (γ* = 1 when the BN keeps its statistics)."""
        bn = self.module.get_submodule(site.bn)
        rho = g / g_star
        self.applied[site.layer] = (site.bn_node, "bn", rho, 1)
        if bn.weight is not None:
            bn.weight = nn.Parameter((bn.weight.detach().double() * rho).to(bn.weight.dtype), bn.weight.requires_grad)
        else:  # no affine weight: the same scale through the variance it divides by
            var = (bn.running_var.double() + bn.eps) / rho.square() - bn.eps
            bn.running_var = var.clamp_min(0).to(bn.running_var.dtype)

    def _note(self, site: Site, g: torch.Tensor, s: torch.Tensor, v_p: torch.Tensor) -> None:
        self.summary[site.layer] = {
            "applied_at": site.bn or site.layer,
            "gamma_min": float(g.min()),
            "gamma_mean": float(g.mean()),
            "gamma_max": float(g.max()),
            "shrunk": int((s < 0.5).sum()),
        }
        self.channels[site.layer] = {
            "v_dense": self.v_dense[site.node].tolist(),
            "v_pruned": v_p.tolist(),
            "gamma": g.tolist(),
        }


def _unfold(gm: fx.GraphModule, applied: dict[str, tuple]) -> fx.GraphModule:
    """Take each folded correction back out of its layer/BN and apply it as a ChannelAffine op after it.
    After a BN whose weight was scaled by ρ: ρ·BN(x) + β(1 − ρ) = (ρ w) x̂ + β, the folded result."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for where, how, rho, dim in applied.values():
        node = nodes[where]
        module = gm.get_submodule(node.target)
        shift = None
        if how == "rows":
            _scale_rows(module, 1.0 / rho)
        elif module.weight is not None:
            w = module.weight
            module.weight = nn.Parameter((w.detach().double() / rho).to(w.dtype), w.requires_grad)
            if module.bias is not None:
                shift = (module.bias.detach().double() * (1 - rho)).float()
        else:  # the variance trick of _apply_at_bn, undone; without affine the BN's output has no shift
            var = (module.running_var.double() + module.eps) * rho.square() - module.eps
            module.running_var = var.clamp_min(0).to(module.running_var.dtype)
        name = f"{where}_asr"
        gm.add_submodule(name, ChannelAffine(rho.float(), shift, dim))
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u, scaled=scaled: u is not scaled)
    gm.graph.lint()
    gm.recompile()
    return gm


def _scale_rows(layer: nn.Module, g: torch.Tensor) -> None:
    """Fold γ into the layer's output rows: weight[i] ← γ_i weight[i], bias[i] ← γ_i bias[i]."""
    w = layer.weight
    shape = [-1] + [1] * (w.dim() - 1)
    layer.weight = nn.Parameter((w.detach().double() * g.view(shape)).to(w.dtype), w.requires_grad)
    if layer.bias is not None:
        b = layer.bias
        layer.bias = nn.Parameter((b.detach().double() * g).to(b.dtype), b.requires_grad)
