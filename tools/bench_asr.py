"""Post-pruning repair after one-shot magnitude pruning: ASR against its baselines, in one run.

    python tools/bench_asr.py [--quick] [--json out.jsonl] [--write-md docs/results/asr.md] [--plot-dir docs]

Models (trained once with fxslim.zoo.train.train_baseline and cached): ResNet-20 (2-D) and VGG-BN on
scikit-learn digits (1×8×8), ResNet-20-1D on synthetic AMR (11 classes, 2×128 I/Q). Each is pruned with
`magnitude_prune` (global unstructured at 50/70/80/90/95% and 2:4), then repaired by: nothing; BN-only
(`bn_recalibrate`); layer-wise + BN, ASR without shrinkage + BN and ASR + BN (`asr`) at each placement
("conv": the paper's literal order, "bn": applied through the re-estimated BN); plus layer-wise and ASR
without BN recalibration. Every repair sees the same 1024 calibration samples drawn from the training split
with the calibration seed (3 seeds: mean ± std of test accuracy). Also times `asr` on ResNet-20 with 1024
calibration samples at the CIFAR input size (3×32×32, random weights and inputs) and plots per-channel
variances (dense vs pruned vs repaired). The AMR set is 30 frames per (class, SNR) by default (6,600
frames; training the baseline on the default 100 takes several minutes on this 2-core machine): --amr-n.
--quick: one seed, 90% and 2:4 only, 20 AMR frames per (class, SNR)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import fx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench_io import pyplot, save_figure  # noqa: E402

import fxslim  # noqa: E402
from fxslim.pass_api import PassContext  # noqa: E402
from fxslim.passes import asr, bn_recalibrate, magnitude_prune  # noqa: E402
from fxslim.zoo.models import build  # noqa: E402
from fxslim.zoo.train import TrainConfig, Trained, evaluate, train_baseline  # noqa: E402

CONFIG = TrainConfig(epochs=20, patience=5)  # the settings of tools/train.py: its checkpoints are reused
MODELS = {  # name -> (zoo model, model kwargs, dataset)
    "resnet20": ("resnet20", {"in_ch": 1}, "digits"),
    "vgg_bn": ("vgg_bn", {"in_ch": 1}, "digits"),
    "resnet20_1d": ("resnet20_1d", {}, "amr"),
}
SPARSITIES = ["0.5", "0.7", "0.8", "0.9", "0.95", "2:4"]
# method -> asr options (None: no asr; "bn": BN-only recalibration; "none": pruned, nothing else)
METHODS: dict[str, dict | str] = {
    "none": "none",
    "BN-only": "bn",
    "LW (no BN)": {"placement": "conv", "mode": "layer", "recalibrate_bn": False},
    "ASR (no BN)": {"placement": "conv", "recalibrate_bn": False},
    "LW+BN conv": {"placement": "conv", "mode": "layer"},
    "ASR-noshrink+BN conv": {"placement": "conv", "shrinkage": False},
    "ASR+BN conv": {"placement": "conv"},
    "LW+BN bn": {"placement": "bn", "mode": "layer"},
    "ASR-noshrink+BN bn": {"placement": "bn", "shrinkage": False},
    "ASR+BN bn": {"placement": "bn"},
}
SAMPLES, BATCH = 1024, 128
PLOT_POINTS = {
    "resnet20": ("layer3.2.conv2", "layer3.2.bn2"),
    "resnet20_1d": ("layer3.2.conv2", "layer3.2.bn2"),
    "vgg_bn": ("features.10.0", "features.10.1"),
}


def calibration(ds, seed: int) -> list:
    """SAMPLES training samples chosen by `seed`, in batches of BATCH."""
    x = torch.cat([b[0] for b in ds.train])
    y = torch.cat([b[1] for b in ds.train])
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:SAMPLES]
    return [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]


def prune(gm, ctx: PassContext, sparsity: str):
    options = {"pattern": sparsity} if ":" in sparsity else {"sparsity": float(sparsity)}
    return magnitude_prune.run(gm, ctx, **options)


def repair(pruned, ctx: PassContext, method: dict | str):
    if method == "none":
        return pruned
    if method == "bn":
        return bn_recalibrate.run(pruned, ctx, calib_batches=len(ctx.data)).module
    return asr.run(pruned, ctx, calib_samples=SAMPLES, **method).module


def data_kwargs(key: str, amr_n: int) -> dict:
    """The dataset options of model `key`: the AMR set's frames per (class, SNR); the digits take none."""
    return {"n_per_class_snr": amr_n} if MODELS[key][2] == "amr" else {}


def traced_baseline(key: str, amr_n: int) -> tuple[Trained, torch.Tensor, fx.GraphModule]:
    """Model `key` trained on its dataset (or read from the cache), two test inputs, and the model traced on them."""
    name, kwargs, data = MODELS[key]
    trained = train_baseline(name, data, model_kwargs=kwargs, data_kwargs=data_kwargs(key, amr_n), config=CONFIG)
    example = trained.dataset.example(2)
    return trained, example, fxslim.trace(trained.model, (example,))


def run_model(key: str, seeds: list[int], sparsities: list[str], amr_n: int, bar: tqdm) -> tuple[list, dict]:
    trained, example, gm = traced_baseline(key, amr_n)
    ds = trained.dataset
    dense_acc = evaluate(gm, ds)["accuracy"]
    info = {
        "model": key,
        "dataset": MODELS[key][2],
        "data_kwargs": data_kwargs(key, amr_n),
        "dense_accuracy": dense_acc,
        "test_samples": int(sum(len(b[1]) for b in ds.test)),
        "train_cached": trained.cached,
        "train_seconds": trained.info["train_seconds"],
    }
    rows = []
    for sparsity in sparsities:
        base_ctx = PassContext((example,), data=calibration(ds, seeds[0]), reference=gm)
        pruned = prune(gm, base_ctx, sparsity)
        for seed in seeds:
            ctx = PassContext((example,), data=calibration(ds, seed), seed=seed, reference=gm)
            for method, options in METHODS.items():
                if options == "none" and seed != seeds[0]:  # no calibration data used: same for every seed
                    acc = next(r["accuracy"] for r in rows if r["sparsity"] == sparsity and r["method"] == method)
                    seconds = 0.0
                else:
                    t0 = time.perf_counter()
                    repaired = repair(pruned.module, ctx, options)
                    seconds = time.perf_counter() - t0
                    acc = evaluate(repaired, ds)["accuracy"]
                rows.append(
                    {
                        "model": key,
                        "sparsity": sparsity,
                        "achieved": pruned.record["sparsity"],
                        "method": method,
                        "seed": seed,
                        "accuracy": acc,
                        "seconds": seconds,
                    }
                )
                bar.update()
    return rows, info


def aggregate(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["sparsity"], r["method"]), []).append(r["accuracy"])
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in out.items()}


def verdicts(agg: dict, models: list[str], sparsity: str = "0.9") -> dict[str, dict]:
    """Per placement: does ASR+BN beat LW+BN and BN-only by more than the seed spread at `sparsity`?"""
    out = {}
    for placement in ("conv", "bn"):
        per_model = {}
        for m in models:
            if (m, sparsity, "BN-only") not in agg:
                continue
            a, sa = agg[(m, sparsity, f"ASR+BN {placement}")]
            lw, slw = agg[(m, sparsity, f"LW+BN {placement}")]
            bn, sbn = agg[(m, sparsity, "BN-only")]
            margin = a - max(lw, bn)
            per_model[m] = {"margin": margin, "spread": max(sa, slw, sbn), "wins": margin > max(sa, slw, sbn)}
        out[placement] = {"models": per_model, "target_met": sum(v["wins"] for v in per_model.values()) >= 2}
    return out


def time_asr(repeats: int = 1) -> dict:
    """Wall and process CPU seconds of `asr` on ResNet-20 (3×32×32, random weights), 1024 samples, 90%."""
    torch.manual_seed(0)
    model = build("resnet20").eval()
    x = torch.randn(SAMPLES, 3, 32, 32)
    data = [(x[i : i + BATCH], None) for i in range(0, SAMPLES, BATCH)]
    gm = fxslim.trace(model, (x[:2],))
    ctx = PassContext((x[:2],), data=data, reference=gm)
    pruned = magnitude_prune.run(gm, ctx, sparsity=0.9).module
    out = {}
    for placement in ("bn", "conv"):
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            asr.run(pruned, ctx, placement=placement, calib_samples=SAMPLES)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[placement] = {"wall_s": min(wall), "cpu_s": min(cpu)}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        gm(x)
    out["one_forward"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    return out


def variance_plot(key: str, amr_n: int, seed: int, sparsity: str, points: tuple[str, str], path: Path) -> None:
    """Per-channel variance at a conv's output and at its BN's output (test inputs): dense, pruned, and each
    repair (one calibration seed)."""
    plt = pyplot()

    trained, example, gm = traced_baseline(key, amr_n)
    ds = trained.dataset
    ctx = PassContext((example,), data=calibration(ds, seed), seed=seed, reference=gm)
    pruned = prune(gm, ctx, sparsity).module
    variants = {
        "dense": gm,
        "pruned": pruned,
        "BN-only": repair(pruned, ctx, "bn"),
        "LW+BN (bn)": repair(pruned, ctx, METHODS["LW+BN bn"]),
        "ASR+BN (bn)": repair(pruned, ctx, METHODS["ASR+BN bn"]),
        "ASR (no BN)": repair(pruned, ctx, METHODS["ASR (no BN)"]),
    }
    test_x = torch.cat([b[0] for b in ds.test])[:1024]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, point in zip(axes, points, strict=True):
        order = None
        for label, model in variants.items():
            v = _variance_at(model, point, test_x)
            if order is None:
                order = np.argsort(-v)
            ax.semilogy(v[order], "o-" if label == "dense" else ".-", label=label, lw=0.8, ms=3)
        ax.set_xlabel("channel (sorted by dense variance)")
        ax.set_ylabel("variance over test inputs")
        ax.set_title(f"{key} {sparsity} sparsity: {point} output", fontsize=9)
    axes[0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def _variance_at(model, module: str, x: torch.Tensor) -> np.ndarray:
    seen = {}
    handle = model.get_submodule(module).register_forward_hook(lambda m, i, o: seen.setdefault("v", o))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return asr.channel_variance(seen["v"], 1).numpy()


def markdown(
    agg: dict,
    infos: list[dict],
    models: list[str],
    sparsities: list[str],
    seeds: list[int],
    verdict: dict,
    timing: dict,
    command: str,
    commit: str,
) -> str:
    lines = [
        "# ASR: channel-wise repair after one-shot magnitude pruning",
        "",
        f"Produced by `{command}` at commit `{commit}` (2-core CPU, one torch thread). Top-1 test accuracy in %,",
        f"mean ± std over {len(seeds)} calibration seed(s) ({SAMPLES} training samples each); global L1",
        "magnitude pruning of every conv/linear weight (2:4: along the input dim; layers whose input width is",
        "not a multiple of 4, here the stems, stay dense). `conv`/`bn` = where `asr` applies γ (see below).",
        "",
    ]
    for info in infos:
        m = info["model"]
        lines += [
            f"## {m} on {info['dataset']} {info['data_kwargs'] or ''}".rstrip(),
            "",
            f"Dense: {100 * info['dense_accuracy']:.2f}% on {info['test_samples']} test samples.",
            "",
            "| method | " + " | ".join(sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        for method in METHODS:
            cells = []
            for s in sparsities:
                mean, std = agg[(m, s, method)]
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Target: ASR + BN beats layer-wise + BN and BN-only at 90% by more than the seed spread", ""]
    for placement, v in verdict.items():
        detail = ", ".join(
            f"{m}: margin {100 * r['margin']:+.1f} pts vs spread {100 * r['spread']:.1f}"
            for m, r in v["models"].items()
        )
        lines.append(f"- placement `{placement}`: {'MET' if v['target_met'] else 'not met'} ({detail})")
    lines += [
        "",
        "## Methods",
        "",
        "- `none`: pruned weights, BatchNorm statistics of the dense model.",
        "- `BN-only`: `bn_recalibrate` on the calibration samples (cumulative statistics over 8 batches).",
        "- `LW`: layer-wise repair, one γ = sqrt(mean v_d / mean v_p) per layer; `ASR`: one γ per output",
        "  channel, γ = s γ* + (1 − s), γ* = sqrt(v_d / v_p), s = v_p / (v_p + λ), λ = 0.05 × the layer's",
        "  median v_p; `ASR-noshrink`: γ = γ*. Variances at each conv/linear output on the calibration",
        "  samples, dense vs pruned, layer by layer (each layer measured after the earlier ones are repaired).",
        "- placement `conv` (the paper's order): γ folded into the layer's output rows, then `bn_recalibrate`.",
        "  The re-estimated BN divides the scale out again, so at every conv followed by a BN this is BN-only;",
        "  only the final linear layer (no BN behind it) differs.",
        "- placement `bn`: each BN re-estimated in sequence (re-centring the channel and giving it the full",
        "  correction γ*), then its weight multiplied by γ / γ*, so the channel ends with the method's γ.",
        "  `ASR-noshrink+BN bn` is therefore BN-only again (up to the final linear and one-batch vs",
        "  8-batch statistics); `LW+BN bn` gives each layer one scale after re-centring.",
        "- `(no BN)`: the repair alone, BN statistics left as they were.",
        "",
        "Per-channel variances (test inputs) at the last conv of each model, dense vs pruned vs repaired:",
        "`docs/asr_variance_<model>.png`.",
    ]
    t = timing
    lines += [
        "",
        "## Time (training-free target: ASR on ResNet-20, 1024 calibration samples, < 20 s)",
        "",
        f"ResNet-20 at 3×32×32 (random weights), 90% sparsity, 1024 samples: placement `bn` "
        f"{t['bn']['wall_s']:.1f} s wall / {t['bn']['cpu_s']:.1f} s CPU; placement `conv` (with the "
        f"bn_recalibrate pass after) {t['conv']['wall_s']:.1f} s wall / {t['conv']['cpu_s']:.1f} s CPU; "
        f"one dense forward of the 1024 samples: {t['one_forward']['wall_s']:.1f} s wall.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--amr-n", type=int, default=None, help="AMR frames per (class, SNR); default 30, --quick 20")
    p.add_argument("--json", default=None, help="append one JSON line of figures to this file")
    p.add_argument("--write-md", default=None)
    p.add_argument("--plot-dir", default=None, help="write asr_variance_<model>.png here")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument(
        "--merge-json",
        default=None,
        help="also tabulate the rows of earlier runs (JSON lines written by --json) for other models",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",")
    seeds = [0] if args.quick else list(range(args.seeds))
    sparsities = ["0.9", "2:4"] if args.quick else SPARSITIES
    amr_n = args.amr_n or (20 if args.quick else 30)

    rows, infos = [], []
    bar = tqdm(total=len(models) * len(sparsities) * len(seeds) * len(METHODS), desc="repairs", disable=None)
    for key in models:
        r, info = run_model(key, seeds, sparsities, amr_n, bar)
        rows += r
        infos.append(info)
    bar.close()
    ran, merged = list(models), []
    if args.merge_json:
        for line in Path(args.merge_json).read_text().splitlines():
            earlier = json.loads(line)
            new = [i for i in earlier["infos"] if i["model"] not in models]
            infos += new
            models += [i["model"] for i in new]
            rows += [r for r in earlier["rows"] if r["model"] in {i["model"] for i in new}]
            if new:
                merged.append(f"{', '.join(i['model'] for i in new)}: `{earlier['command']}` at `{earlier['commit']}`")
    agg = aggregate(rows)
    verdict = verdicts(agg, models)
    timing = {} if args.no_timing else time_asr()

    for info in infos:
        m = info["model"]
        print(f"\n{m} ({info['dataset']}, dense {100 * info['dense_accuracy']:.2f}%)")
        print(f"{'method':<22}" + "".join(f"{s:>14}" for s in sparsities))
        for method in METHODS:
            cells = (agg[(m, s, method)] for s in sparsities)
            print(f"{method:<22}" + "".join(f"{100 * mean:>8.1f} ±{100 * std:>4.1f}" for mean, std in cells))
    for placement, v in verdict.items():
        print(
            f"target at 90% with placement {placement}: {'MET' if v['target_met'] else 'not met'} "
            + ", ".join(f"{m} {100 * r['margin']:+.1f}±{100 * r['spread']:.1f}" for m, r in v["models"].items())
        )
    if timing:
        print("asr time, ResNet-20 3x32x32, 1024 samples: " + json.dumps(timing))

    command = "python tools/bench_asr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    if args.json:
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "bench": "asr",
                        "command": command,
                        "commit": commit,
                        "infos": infos,
                        "rows": rows,
                        "verdict": verdict,
                        "timing": timing,
                    }
                )
                + "\n"
            )
    if args.write_md and timing:
        Path(args.write_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_md).write_text(
            markdown(agg, infos, models, sparsities, seeds, verdict, timing, command, commit)
        )
    if args.plot_dir:
        for key, points in PLOT_POINTS.items():
            if key in ran:
                variance_plot(key, amr_n, seeds[0], "0.9", points, Path(args.plot_dir) / f"asr_variance_{key}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
