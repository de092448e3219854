"""Equivariant compression benchmark: a C4 e2cnn CNN on rotated digits, pruned, fine-tuned and quantized.

It trains (or loads the cached) `c4net` baseline, fields (8, 16, 32), on rotated digits (28×28, random
multiples of 90°) to convergence, then,
all in the same process:

- `linear p`: equivariant_prune(scope="linear", ratio=p), the paper's FC-only L2 pruning, p in 30/50/70%
- `fields p`: equivariant_prune(scope="fields", ratio=p), whole-field R2Conv pruning, p in 30/50%, also with
  reconstruct=True (least-squares re-fit of the layers after the pruned ones, see NOTES)
  each with no fine-tune, the adaptive fine-tune (`finetune.PAPER_ADAPTIVE`: only when the held-out drop
  exceeds 2 points; Adam 1e-3, ReduceLROnPlateau(0.5, 10), early stopping), the same with KD (T=4), and
  for fields the same gate with a cosine schedule (`finetune.COSINE_ADAPTIVE`: Adam 3e-3 annealed to 0
  over 100 epochs), with and without KD;
- `unaligned 50%`: the e2cnn model's conv channels pruned one by one (L1, analysis with fields=False, applied
  outside the pass manager, which would refuse it): how much invariance a misaligned cut breaks;
- `plain CNN`: the same layers and MACs as the C4 net's plain twin, trained from random init as an ordinary
  CNN, then prune_channels(0.5) + the paper's adaptive fine-tune and the cosine one with KD (no equivariance
  to keep);
- `wide`: a C4Net twice as wide, fields (16, 32, 64), trained the same way, pruned at 50% of its fields (which
  leaves exactly the (8, 16, 32) architecture) with the fine-tunes with KD;
- `INT8`: the wide fields-50% + cosine fine-tune with KD model through quantize(backend="ort_static") (the
  deployment path; once more with the first R2Conv kept fp32) and quantize(backend="torch_dynamic") (the
  paper's).

Per row: test accuracy, drop vs baseline (points), invariance error (max |f(rot90^k x) − f(x)| over a test
batch), params, MACs, fine-tune epochs, ONNX bytes, and onnxruntime latency (process CPU time, one thread,
interleaved, batch 1 and 64) with its speed-up over the fp32 baseline. Measurement only.

    python tools/bench_equivariant.py --quick          # the plot goes to runs/equivariant/
    python tools/bench_equivariant.py --json runs/equivariant/equivariant.jsonl \
        --write-md docs/results/equivariant.md --plot docs/equivariant_accuracy_vs_params.png   # the docs' page
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import md_link, pyplot, run_path, save_figure, write_outputs  # noqa: E402

import fxslim  # noqa: E402
from fxslim.export import export_report, ort_latency  # noqa: E402
from fxslim.graph.cost import count  # noqa: E402
from fxslim.graph.deps import analyze  # noqa: E402
from fxslim.importance import atom_scores  # noqa: E402
from fxslim.passes.finetune import COSINE_ADAPTIVE, PAPER_ADAPTIVE  # noqa: E402
from fxslim.rewrite import ChannelPlan, apply_plan  # noqa: E402
from fxslim.training import evaluate_accuracy, fit  # noqa: E402
from fxslim.zoo.train import TrainConfig, train_baseline  # noqa: E402

FULL = {
    "arch": (8, 16, 32),  # C4Net fields per block (kernels 5, 3, 3)
    "base_epochs": 100,  # the baseline is trained to convergence: Adam 3e-3 annealed by a cosine, no early stop
    "base_lr": 3e-3,
    "batch_size": 32,  # 36 steps per epoch on the 1,150 training digits
    "ft_epochs": 50,  # the paper's cap and patience
    "ft_patience": 10,
    "cos_epochs": 100,  # finetune.COSINE_ADAPTIVE
    "linear": [0.3, 0.5, 0.7],
    "fields": [0.3, 0.5],
    "reconstruct": [0.5],  # field ratios also run with reconstruct=True
    "reconstruct_batches": 8,  # equivariant_prune(reconstruct=True): 256 digits x 4 rotations
    "control": False,  # the unpruned net given the cosine fine-tune too (the baseline is trained to convergence)
    "latency_budget": 1.0,
    "plain_epochs": 100,
    "amr_int8": True,
    "wide": (16, 32, 64),  # a C4Net twice as wide, trained the same way, pruned at 50% of its fields too
    "wide_fields": [0.5],
}
QUICK = {
    "arch": (8, 16, 32),
    "base_epochs": 3,
    "base_lr": 3e-3,
    "batch_size": 128,
    "ft_epochs": 2,
    "ft_patience": 1,
    "cos_epochs": 2,
    "linear": [0.5],
    "fields": [0.5],
    "reconstruct": [0.5],
    "reconstruct_batches": 2,
    "control": True,
    "latency_budget": 0.2,
    "plain_epochs": 3,
    "amr_int8": False,
    "wide": (16, 32, 64),
    "wide_fields": [0.5],
}
FT_MODES = ("none", "adaptive", "adaptive+KD", "adaptive+cosine", "adaptive+cosine+KD")
LINEAR_FT_MODES = ("none", "adaptive", "adaptive+KD")  # the paper's; its cut is small enough for them
RECON_FT_MODES = ("none", "adaptive", "adaptive+cosine")  # after equivariant_prune(reconstruct=True)
WIDE_FT_MODES = ("none", "adaptive+KD", "adaptive+cosine+KD")
FINAL_FT = "adaptive+cosine+KD"
FINAL = ("wide fields 50%", FINAL_FT)  # the pruned model that goes on to INT8 and latency
NOTES = """## How to read this

- *inv. error*: max |f(rot90(x, k)) - f(x)| over k = 1, 2, 3 on 64 rotated test digits (logits). The pass
  manager checks the same quantity on the example input after every pass and stops at 1e-4 (fp32).
- *adaptive*: `finetune.PAPER_ADAPTIVE` (train only when the held-out drop exceeds 2 points; Adam 1e-3,
  ReduceLROnPlateau(0.5, 10), early stopping), with the epoch cap and patience of the config above (the
  paper allows 50 epochs); *FT ep* is 0 when the gate skipped training. Fine-tuning a C4 model projects its
  convs back onto the equivariant subspace before every forward (projected gradient descent), which is
  why the invariance survives training the plain twin.
- *C4 baseline*: C4Net with fields (8, 16, 32) trained to convergence (config `base_epochs`, Adam
  `base_lr` annealed to 0 by a cosine, no early stopping). With config `control` on, a second row gives
  the unpruned net the same cosine fine-tune without the gate (the extra training a pruned net gets);
  drops are always against the plain baseline (first row).
- FC pruning (`linear p`) runs the paper's fine-tunes only: its cut leaves the net within a few points.
- *adaptive+cosine*: `finetune.COSINE_ADAPTIVE`, the same gate, then Adam 3e-3 annealed to 0 by a cosine
  over the config's `cos_epochs`, no early stopping (all batches train). A whole-field cut leaves the C4
  net near chance (each field carries features the pooled head reads), so without reconstruction this
  fine-tune is a retraining from the kept weights; the plateau schedule of the paper stops short of it.
  *+KD*: the loss adds distillation from the unpruned net (temperature 4).
- *+ reconstruct*: `equivariant_prune(reconstruct=True)`: every layer after a pruned one re-fit by least
  squares to the unpruned layer's outputs (`fxslim.reconstruct`) on `reconstruct_batches` training
  batches with their 4 rotations, projected back onto the equivariant subspace; the fine-tune then starts
  far above chance (the "none" row).
- *unaligned*: single channels cut at random (a field-blind pruner; magnitude ties inside a field would
  cut whole fields by accident). The pass manager refuses such a result; it is built outside it here.
- *plain CNN*: the C4 net's plain twin architecture (same layers, same MACs) trained from random init as
  an ordinary CNN, then prune_channels(0.5) + the adaptive fine-tune and the cosine one with KD.
- *wide*: C4Net with fields (16, 32, 64), trained like the C4 baseline; its drops and speed-ups are against
  the wide baseline row. Cutting half its fields leaves the (8, 16, 32) architecture of the C4 baseline,
  so the two rows compare pruning a wide net with training the narrow one from scratch.
- INT8 rows: params/MACs are those of the fp32 model they quantize. ", features.0 fp32": the same ORT
  static file with the first R2Conv (raw pixels in, `quantize(fp32_modules=[...])`) left in fp32. ORT
  static INT8 quantizes the activations (QUInt8) of rotated inputs differently, so its invariance error
  is reported, not enforced;
  torch dynamic INT8 touches only the Linear head after the invariant pooling.
- Latency: onnxruntime, one intra-op thread, process CPU time, files interleaved (fxslim.export.ort_latency),
  speed-up relative to the row's fp32 baseline (C4 baseline or wide C4 baseline); the zoo table compares
  fp32 and INT8 files of the same model.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 training epochs, one ratio per scope, 2 FT epochs")
    p.add_argument("--ft-epochs", type=int, help="fine-tune epoch cap (default 50, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line of all figures to this file")
    p.add_argument("--write-md", help="write the results table to this markdown file")
    p.add_argument(
        "--plot",
        default=str(run_path("equivariant", "equivariant_accuracy_vs_params.png")),
        help="write the accuracy-vs-params chart here (default %(default)s; docs/equivariant_accuracy_vs_params.png"
        " for the docs' figure)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # e2cnn 0.2.3 uint8 masks; torch.ao deprecation
    cfg = dict(QUICK if args.quick else FULL)
    if args.ft_epochs is not None:
        cfg["ft_epochs"] = args.ft_epochs
    t0 = time.perf_counter()
    rows = run(cfg, args.seed)
    wall = time.perf_counter() - t0
    figures = {
        "bench": "equivariant",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "config": cfg,
        "rows": rows,
        "wall_s": wall,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    print(table(rows))
    plot = plot_rows(rows, Path(args.plot))
    print(f"plot: {plot}; wall {wall:.0f} s")
    write_outputs(figures, args.json, args.write_md, markdown(figures, plot, args.write_md) if args.write_md else None)
    return 0


def run(cfg: dict, seed: int) -> list[dict]:
    trained = train_baseline("c4net", "rotated_digits", model_kwargs=_arch(cfg["arch"]), config=_base_config(cfg, seed))
    ds, model = trained.dataset, trained.model.eval()
    bench = Bench(ds, cfg, seed)
    base_gm = fxslim.trace(model)
    base = bench.record("C4 baseline", base_gm, "baseline")
    bench.timed["C4 baseline / none"] = (base_gm, None)
    # Control: the unpruned net given the cosine fine-tune too (no gate), to tell what that training adds alone.
    if cfg["control"]:
        control = {**_ft_options(FINAL_FT, cfg, bench.val_fraction), "adaptive": False}
        res = fxslim.compress(model, (bench.x1,), [{"pass": "finetune", **control}], data=bench.ft_data, seed=seed)
        epochs = res.report[0].details["epochs"]
        bench.record("C4 baseline", res.module, "baseline", f"{FINAL_FT} (control)", epochs, base=base)
    steps = [("linear", p, False, LINEAR_FT_MODES) for p in cfg["linear"]]
    steps += [("fields", p, False, FT_MODES) for p in cfg["fields"]]
    steps += [("fields", p, True, RECON_FT_MODES) for p in cfg["reconstruct"]]
    bench.prune(model, steps, "", base)
    unaligned(base_gm, bench, base)
    plain_cnn(base_gm, bench, base)
    if cfg["wide"]:
        wide = train_baseline(
            "c4net", "rotated_digits", model_kwargs=_arch(cfg["wide"]), config=_base_config(cfg, seed)
        ).model.eval()
        wide_gm = fxslim.trace(wide)
        wide_base = bench.record("wide C4 baseline", wide_gm, "wide")
        bench.timed[wide_base["key"]] = (wide_gm, None)
        steps = [("fields", p, False, WIDE_FT_MODES) for p in cfg["wide_fields"]]
        bench.prune(wide, steps, "wide ", wide_base)
    if bench.final is not None:
        bench.int8(*bench.final)
    latency(bench.rows, bench.timed, ds, cfg["latency_budget"])
    rows = bench.rows
    rows += zoo_int8_latency(cfg["latency_budget"], seed)
    rows += zoo_int8_trained(cfg["latency_budget"], seed, AMR_INT8 if cfg["amr_int8"] else ())
    return rows


class Bench:
    """The rows of one run and what they share: the data, the probes, the models to time with onnxruntime."""

    def __init__(self, ds, cfg: dict, seed: int) -> None:
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.x1 = ds.test[0][0][:1]
        self.probe = ds.test[0][0][:64]  # the invariance probe: 64 rotated test digits
        self.ft_data = ds.train + ds.val  # finetune holds out the last batches (= ds.val) for its drop and early stop
        self.val_fraction = (len(ds.val) - 0.5) / len(self.ft_data)
        self.rows: list[dict] = []
        # ORT latency: row key -> (module, None for fp32 | the fp32_modules of an INT8 file)
        self.timed: dict[str, tuple[nn.Module, list[str] | None]] = {}
        self.final: tuple[nn.Module, dict] | None = None  # FINAL's module and its baseline row

    def record(
        self,
        name: str,
        gm: nn.Module,
        group: str,
        ft: str = "none",
        ft_epochs: int | None = None,
        extra: dict | None = None,
        cost_of: nn.Module | None = None,
        base: dict | None = None,
    ) -> dict:
        """One row; `base` is the baseline row its drop is measured against (none: it is a baseline)."""
        acc = evaluate_accuracy(gm, self.ds.test)
        params, macs = _params_of(cost_of if cost_of is not None else gm, self.x1)
        row = {
            "name": name,
            "key": f"{name} / {ft}",
            "group": group,
            "finetune": ft,
            "accuracy": acc,
            "drop_pts": 100 * (base["accuracy"] - acc) if base else 0.0,
            "invariance_error": _rot_error(gm, self.probe),
            "params": params,
            "macs": macs,
            "ft_epochs": ft_epochs,
            "base_key": base["key"] if base else f"{name} / {ft}",  # the speed-ups are against this row
            **(extra or {}),
        }
        self.rows.append(row)
        tqdm.write(f"{name:32s} {ft:12s} acc {acc:.4f}  inv {row['invariance_error']:.2e}")
        return row

    def prune(self, model: nn.Module, steps: list, prefix: str, base: dict) -> None:
        """equivariant_prune at each (scope, ratio, reconstruct, fine-tune modes) step, one row per mode."""
        for scope, ratio, recon, modes in tqdm(steps, desc=f"{prefix}pruning configs"):
            for ft in modes:
                prune = {"pass": "equivariant_prune", "scope": scope, "ratio": ratio}
                if recon:
                    prune.update(reconstruct=True, calib_batches=self.cfg["reconstruct_batches"])
                recipe: list = [prune]
                if ft != "none":
                    recipe.append({"pass": "finetune", **_ft_options(ft, self.cfg, self.val_fraction)})
                res = fxslim.compress(model, (self.x1,), recipe, data=self.ft_data, seed=self.seed)
                ft_rec = res.report[-1].details if ft != "none" else {}
                name = f"{prefix}{scope} {int(round(ratio * 100))}%" + (" + reconstruct" if recon else "")
                epochs = (ft_rec["epochs"] if ft_rec.get("trained") else 0) if ft != "none" else None
                recon_err = res.report[0].details.get("reconstructed") if recon else None
                extra = {
                    "pm_invariance_error": max(r.symmetry_error for r in res.report),
                    "held_out_drop_pts": 100 * ft_rec["drop_before"] if ft_rec else None,
                    **({"reconstruction": recon_err} if recon_err else {}),
                }
                row = self.record(name, res.module, "wide" if prefix else scope, ft, epochs, extra, base=base)
                if (name, ft) == FINAL:
                    self.final = (res.module, base)
                    self.timed[row["key"]] = (res.module, None)

    def int8(self, final: nn.Module, base: dict) -> None:
        """FINAL through ORT static INT8 (also with the first R2Conv fp32) and torch dynamic INT8."""
        first = final.meta["field_layout"][0].layer  # the first R2Conv, on the raw pixels
        for backend, keep in (("ort_static", []), ("ort_static", [first]), ("torch_dynamic", [])):
            opts = {"backend": backend, "eval_batches": 0, **({"fp32_modules": keep} if keep else {})}
            res = fxslim.compress(
                final,
                (self.x1,),
                [{"pass": "quantize", **opts}],
                data=self.ds.train[: 1024 // self.cfg["batch_size"]],  # 1,024 calibration digits
                seed=self.seed,
            )
            rec = res.report[0].details
            ops = rec.get("quantized_ops") or {"dynamic Linear": rec.get("quantized_linear")}
            name = f"{FINAL[0]} + INT8 {backend}" + (f", {', '.join(keep)} fp32" if keep else "")
            extra = {"quantized_ops": ops, "pm_invariance_error": res.report[0].symmetry_error}
            row = self.record(name, res.module, "int8", FINAL_FT, None, extra, cost_of=final, base=base)
            if backend == "ort_static":
                self.timed[row["key"]] = (final, keep)


def _arch(fields) -> dict:
    return {"fields": tuple(fields), "kernels": (5, 3, 3)}


def _base_config(cfg: dict, seed: int) -> TrainConfig:
    """The baseline's training (and the plain twin's): Adam, cosine-annealed, every epoch, no early stop."""
    return TrainConfig(
        epochs=cfg["base_epochs"],
        lr=cfg["base_lr"],
        scheduler="cosine",
        batch_size=cfg["batch_size"],
        patience=None,
        seed=seed,
    )


def _ft_options(ft: str, cfg: dict, val_fraction: float) -> dict:
    """The finetune options of fine-tune mode `ft` (one of FT_MODES but "none")."""
    if ft.startswith("adaptive+cosine"):
        opts = {**COSINE_ADAPTIVE, "epochs": cfg["cos_epochs"], "val_fraction": val_fraction}
    else:
        opts = {
            **PAPER_ADAPTIVE,
            "epochs": cfg["ft_epochs"],
            "patience": cfg["ft_patience"],
            "val_fraction": val_fraction,
        }
    if ft.endswith("+KD"):
        opts["kd_temperature"] = 4.0
    return opts


def zoo_int8_latency(budget: float, seed: int) -> list[dict]:
    """ORT static INT8 vs fp32 on two zoo CNNs at CIFAR size (random weights: latency does not depend on
    training), batch 1 and 64: the speed-up the deployment path gives on larger convs than the C4 net's."""
    from fxslim.zoo import models as zoo
    from fxslim.zoo.randnet import randomize_bn

    out = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_equivariant_zoo_"))
    for name in ("resnet20", "vgg_bn"):
        torch.manual_seed(seed)
        model = randomize_bn(zoo.build(name), seed=seed).eval()
        row = {
            "name": f"zoo {name} fp32 vs INT8 ort_static (random weights: latency only)",
            "group": "zoo-latency",
            "input": "3×32×32",
        }
        row.update(
            _int8_speed(model, lambda b: torch.rand(b, 3, 32, 32), [torch.rand(64, 3, 32, 32)] * 2, tmp / name, budget)
        )
        tqdm.write(f"{row['name']}: speed-up b1 {row['speedup_b1']:.2f}x, b64 {row['speedup_b64']:.2f}x")
        out.append(row)
    return out


AMR_INT8 = ("cnn1d", "resnet56_1d")  # trained zoo CNNs whose baselines tools/bench_fcos.py caches
AMR_CONFIG = {"config": TrainConfig(epochs=20, patience=5), "data_kwargs": {"n_per_class_snr": 100}}


def zoo_int8_trained(budget: float, seed: int, names: tuple[str, ...] = AMR_INT8) -> list[dict]:
    """ORT static INT8 vs fp32 on trained zoo CNNs on the synthetic AMR set (2×128 I/Q frames): the test
    accuracy of both (the quantize pass scores fp32 and INT8 on the test batches, calibrated on 8 training
    batches), and their latency at batch 1 and 64 (files exported at those batch sizes, see `_int8_speed`)."""
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_equivariant_amr_"))
    for name in names:
        trained = train_baseline(name, "amr", **AMR_CONFIG)
        ds = trained.dataset
        x1 = ds.example()
        res = fxslim.compress(
            trained.model,
            (x1,),
            [{"pass": "quantize", "backend": "ort_static", "calib_batches": 8, "eval_batches": len(ds.test)}],
            data=ds.train[:8] + ds.test,  # calibrate on the first 8 batches, score on the last len(test): the test set
            seed=seed,
        )
        rec = res.report[0].details
        row = {
            "name": f"zoo {name} (AMR, trained) fp32 vs INT8 ort_static",
            "group": "zoo-latency",
            "input": "2×128",
            "acc_fp32": rec["acc_fp32"],
            "acc_int8": rec["acc_int8"],
            "int8_drop_pts": 100 * rec["drop"],
            "quantized_ops": rec["quantized_ops"],
        }
        speed = _int8_speed(trained.model, ds.example, [b[0] for b in ds.train[:8]], tmp / name, budget)
        row.update({k: v for k, v in speed.items() if k != "quantized_ops"})  # the scored file's counts stay
        tqdm.write(
            f"{row['name']}: acc {row['acc_fp32']:.4f} -> {row['acc_int8']:.4f}, "
            f"speed-up b1 {row['speedup_b1']:.2f}x, b64 {row['speedup_b64']:.2f}x"
        )
        out.append(row)
    return out


def _int8_speed(model: nn.Module, example, calib: list, prefix: Path, budget: float) -> dict:
    """fp32 and ORT static INT8 files of `model` exported at batch 1 and 64 (inputs `example(batch)`, INT8
    calibrated on `calib`), their onnxruntime time per run interleaved, the speed-up, and the ops that ran
    quantized."""
    out: dict = {}
    for batch in (1, 64):
        x = example(batch)
        path = prefix.with_name(f"{prefix.name}_b{batch}.onnx")
        rep = export_report(model, (x,), path, quantize="int8", calib_data=calib)
        t = ort_latency({"fp32": str(rep.fp32_path), "int8": str(path)}, x, budget_s=budget)
        out[f"fp32_ms_b{batch}"], out[f"int8_ms_b{batch}"] = 1e3 * t["fp32"], 1e3 * t["int8"]
        out[f"speedup_b{batch}"] = t["fp32"] / t["int8"]
        out["quantized_ops"] = rep.quantized_ops
    return out


def _params_of(gm: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    c = count(gm, (x,))
    return c.params, c.macs


def _rot_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x)
        return max(float((model(torch.rot90(x, k, (2, 3))) - y).abs().max()) for k in (1, 2, 3))


def unaligned(base_gm: fx.GraphModule, bench: Bench, base: dict) -> None:
    """Half the channels of every e2cnn conv removed one by one, ignoring fields. The channels of a field
    have equal norms (rotated copies of one filter), so a magnitude criterion ties and happens to cut whole
    fields; a seeded random choice stands for a pruner that is blind to fields."""
    dg = analyze(base_gm, (bench.x1,), fields=False)
    scores = atom_scores(dg, "random", seed=1)
    plan = ChannelPlan(dg)
    layers = {f.layer for f in base_gm.meta["field_layout"]}
    for g in dg.prunable_groups:
        if not any(m.node.startswith(tuple(layer + ".weight" for layer in layers)) for m in g.members):
            continue
        order = np.argsort(scores[g.atoms], kind="stable")
        plan.target[g.atoms[order[: g.size // 2]]] = -1
    bench.record("unaligned channels 50% (random)", apply_plan(base_gm, plan), "unaligned", base=base)


def plain_cnn(base_gm: fx.GraphModule, bench: Bench, base: dict) -> None:
    """The C4 net's plain twin architecture (same layers, MACs) from random init, trained as a plain CNN."""
    ds, cfg, seed = bench.ds, bench.cfg, bench.seed
    gm = copy.deepcopy(base_gm)
    gm.meta.clear()  # an ordinary CNN: no group, no fields
    torch.manual_seed(seed)
    for m in gm.modules():
        if hasattr(m, "reset_parameters") and m is not gm:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    fit(
        gm,
        lambda e: (ds.train, ds.val),
        epochs=cfg["plain_epochs"],
        lr=cfg["base_lr"],
        scheduler="cosine",  # as the C4 baseline
        seed=seed,
        desc="plain CNN",
    )
    bench.record("plain CNN", gm, "plain", base=base)
    for ft in ("adaptive", FINAL_FT):
        ft_pass = {"pass": "finetune", **_ft_options(ft, cfg, bench.val_fraction)}
        recipe = [{"pass": "prune_channels", "ratio": 0.5}, ft_pass]
        module = fxslim.compress(gm, (bench.x1,), recipe, data=bench.ft_data, seed=seed).module
        bench.record("plain CNN prune_channels 50%", module, "plain", ft, base=base)


def latency(rows: list[dict], timed: dict[str, tuple[nn.Module, list[str] | None]], ds, budget: float) -> None:
    """ONNX size and ORT process CPU time per run at batch 1 and 64 (files exported at that batch size,
    INT8 calibrated on the first 1,024 training digits), interleaved, with the speed-up over the row's fp32
    baseline (C4 baseline or wide C4 baseline)."""
    by_name = {r["key"]: r for r in rows if "key" in r}
    tmp = Path(tempfile.mkdtemp(prefix="bench_equivariant_"))
    calib = [torch.cat([b[0] for b in ds.train])[:1024]]  # cut into batches of the exported size
    for batch in (1, 64):
        x = torch.cat([b[0] for b in ds.test])[:batch]
        files = {}
        for i, (name, (module, keep)) in enumerate(timed.items()):
            path = tmp / f"{i}_b{batch}.onnx"
            if keep is None:
                export_report(module, (x,), path)
            else:
                export_report(module, (x,), path, quantize="int8", calib_data=calib, fp32_modules=keep)
            files[name] = str(path)
            if batch == 1:
                by_name[name]["onnx_bytes"] = path.stat().st_size
        t = ort_latency(files, x, budget_s=budget)
        for name, seconds in t.items():
            by_name[name][f"ort_ms_b{batch}"] = 1e3 * seconds
            by_name[name][f"speedup_b{batch}"] = t[by_name[name]["base_key"]] / seconds


def table(rows: list[dict]) -> str:
    head = [
        "model",
        "fine-tune",
        "acc %",
        "drop pts",
        "inv. error",
        "params",
        "MACs",
        "FT ep",
        "ONNX KB",
        "ORT ms b1",
        "speed-up b1",
        "ORT ms b64",
        "speed-up b64",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r["group"] == "zoo-latency":
            continue
        lines.append(
            " | ".join(
                [
                    r["name"],
                    r["finetune"],
                    f"{100 * r['accuracy']:.2f}",
                    f"{r['drop_pts']:+.2f}",
                    f"{r['invariance_error']:.1e}",
                    _fmt(r.get("params")),
                    _fmt(r.get("macs")),
                    "" if r.get("ft_epochs") is None else str(r["ft_epochs"]),
                    "" if r.get("onnx_bytes") is None else f"{r['onnx_bytes'] / 1024:.1f}",
                    "" if r.get("ort_ms_b1") is None else f"{r['ort_ms_b1']:.3f}",
                    "" if r.get("speedup_b1") is None else f"{r['speedup_b1']:.2f}x",
                    "" if r.get("ort_ms_b64") is None else f"{r['ort_ms_b64']:.2f}",
                    "" if r.get("speedup_b64") is None else f"{r['speedup_b64']:.2f}x",
                ]
            )
        )
    zoo = [r for r in rows if r["group"] == "zoo-latency"]
    zoo_lines = [
        "",
        "| zoo CNN | input | weights | fp32 acc % | INT8 acc % | drop pts | fp32 ms b1 | INT8 ms b1 | speed-up b1 "
        "| fp32 ms b64 | INT8 ms b64 | speed-up b64 | quantized ops |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    zoo_lines += [
        f"| {r['name'].split()[1]} | {r.get('input', '3×32×32')} | {'trained' if 'acc_int8' in r else 'random'} "
        f"| {_pct(r.get('acc_fp32'))} | {_pct(r.get('acc_int8'))} "
        f"| {'' if r.get('int8_drop_pts') is None else format(r['int8_drop_pts'], '+.2f')} "
        f"| {r['fp32_ms_b1']:.3f} | {r['int8_ms_b1']:.3f} | {r['speedup_b1']:.2f}x "
        f"| {r['fp32_ms_b64']:.1f} | {r['int8_ms_b64']:.1f} | {r['speedup_b64']:.2f}x "
        f"| {r['quantized_ops']} |"
        for r in zoo
    ]
    return "\n".join(["| " + ln + " |" for ln in lines] + (zoo_lines if zoo else []))


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _fmt(v) -> str:
    return "" if v is None else f"{v:,}"


def plot_rows(rows: list[dict], path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for group, marker in (
        ("baseline", "*"),
        ("linear", "o"),
        ("fields", "s"),
        ("unaligned", "x"),
        ("plain", "^"),
        ("wide", "P"),
        ("int8", "D"),
    ):
        pts = [(r["params"], 100 * r["accuracy"]) for r in rows if r["group"] == group and r.get("params")]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=group)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (fp32 count)")
    ax.set_ylabel("test accuracy on rotated digits (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def markdown(figures: dict, plot: Path, md_path: str) -> str:
    return "\n".join(
        [
            "# Equivariant compression: C4 e2cnn CNN on rotated digits",
            "",
            f"Produced by `python tools/bench_equivariant.py{' --quick' if figures['quick'] else ''}` on "
            f"{figures['date']} ({figures['machine']}), wall {figures['wall_s']:.0f} s. Config: `{figures['config']}`.",
            "",
            table(figures["rows"]),
            "",
            f"![accuracy vs params]({md_link(plot, md_path)})",
            "",
            NOTES,
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
