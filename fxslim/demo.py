"""`python -m fxslim.demo [--quick]` (what `make demo` runs): the main job on the synthetic AMR set.

It trains (or loads the cached) CNN1D baseline on synthetic RadioML-like I/Q frames (fxslim.zoo.amr),
compresses it with the default recipe (every pass that exists, composed), exports both models to ONNX
(checked in onnxruntime), and prints a before/after table: accuracy overall and at SNR >= 10 dB, params,
MACs, ONNX file size and onnxruntime latency (ratio measured in the same run). It writes the IR dumps, the
ONNX files, a PNG of accuracy vs SNR and a JSON summary to `demo-out/`. Every number is measured in this
run (the baseline's weights may come from the cache); the demo never contains compression logic."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import fxslim
from fxslim.export import ort_latency
from fxslim.zoo.train import TrainConfig, evaluate, train_baseline

RECIPE = [
    {"pass": "fcos_fuse", "epsilon": 0.5},
    {"pass": "lacd_drop", "beta": 0.005, "calib_samples": 1024},
    {"pass": "bn_recalibrate", "calib_batches": 20},
    {"pass": "finetune", "epochs": 6, "lr": 1e-3, "kd_temperature": 4.0},
    "fold_bn",
]
FINETUNE = 3  # index of the finetune step in RECIPE (--quick shortens it)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fxslim.demo",
        description="Train (or load the cached) CNN1D on the synthetic AMR set, compress it with the default "
        "recipe (fcos_fuse 50% -> lacd_drop -> bn_recalibrate -> finetune with distillation -> fold_bn), export "
        "to ONNX and compare accuracy (overall, SNR >= 10 dB), size and onnxruntime latency.",
        epilog="example: python -m fxslim.demo --quick   (outputs go to demo-out/)",
    )
    parser.add_argument("--quick", action="store_true", help="a small data set and few epochs (a smoke run)")
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--model", default="cnn1d", help="zoo model to train (default cnn1d)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One thread: these layers are small, and on a busy 2-core machine two OpenMP threads ran an epoch
    # 5-12x slower than one (measured: 0.6-1.3 s vs 5.1-7.5 s per epoch of the digits model).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(args)
    finally:
        torch.set_num_threads(threads)


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n, epochs, ft_epochs, budget = (12, 2, 1, 0.5) if args.quick else (100, 20, RECIPE[FINETUNE]["epochs"], 4.0)
    config = TrainConfig(epochs=epochs, patience=5, seed=args.seed)
    base = train_baseline(args.model, "amr", data_kwargs={"n_per_class_snr": n}, config=config)
    ds = base.dataset
    how = "loaded from cache" if base.cached else f"trained in {base.info['train_seconds']:.0f} s"
    print(f"data: synthetic AMR, {len(ds.classes)} classes, SNR -20..18 dB, {n} frames per (class, SNR); "
          f"baseline {args.model} {how} ({base.path})")

    recipe = [dict(p) if isinstance(p, dict) else p for p in RECIPE]
    recipe[FINETUNE]["epochs"] = ft_epochs
    if args.quick:
        recipe[1]["calib_samples"] = 256
    x = ds.example()
    print(f"\nfxslim.compress with recipe {recipe}")
    res = fxslim.compress(base.model, (x,), recipe, data=ds.train, dump_dir=out / "ir", seed=args.seed)
    print(res.summary())

    before, after = evaluate(base.model, ds), evaluate(res.module, ds)
    paths = {"original": out / "original.onnx", "compressed": out / "model.onnx"}
    errors = {k: fxslim.export_onnx(m, (x,), paths[k]) for k, m in (("original", base.model),
                                                                        ("compressed", res.module))}
    latency = ort_latency(paths, (x,), budget_s=budget)
    plot = plot_accuracy_vs_snr(before["per_snr"], after["per_snr"], out / "accuracy_vs_snr.png", args.model)

    first, last = res.report[0], res.report[-1]
    size = {k: p.stat().st_size / 1024 for k, p in paths.items()}
    rows = [
        _points_row("test accuracy", before["accuracy"], after["accuracy"]),
        _points_row("accuracy, SNR >= 10 dB", before["accuracy_snr_ge10"], after["accuracy_snr_ge10"]),
        _ratio_row("params", first.params_before, last.params_after, "{:,}"),
        _ratio_row("MACs (batch 1)", first.macs_before, last.macs_after, "{:,}"),
        _ratio_row("ONNX file, KB", size["original"], size["compressed"], "{:.1f}"),
        _ratio_row("ORT latency, us (batch 1, 1 thread)", latency["original"] * 1e6, latency["compressed"] * 1e6,
                   "{:.1f}"),
    ]
    print("\nsummary (latency: median process CPU time per run, files interleaved, one onnxruntime thread)")
    print(summary_table(rows))
    summary = {"model": args.model, "quick": args.quick, "baseline_cached": base.cached,
               "baseline_train_seconds": base.info["train_seconds"], "before": before, "after": after,
               "params": [first.params_before, last.params_after], "macs": [first.macs_before, last.macs_after],
               "onnx_kb": size, "onnx_max_abs_error": errors, "ort_seconds": latency,
               "wall_seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nONNX parity (max abs error): original {errors['original']:.1e}, compressed {errors['compressed']:.1e}")
    print(f"outputs in {out}/: ir/ (IR dumps), model.onnx, original.onnx, {plot.name}, summary.json")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def plot_accuracy_vs_snr(before: dict, after: dict, path: Path, model: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, curve, style in (("baseline", before, "o-"), ("compressed", after, "s--")):
        snrs = sorted(curve)
        ax.plot(snrs, [100 * curve[s] for s in snrs], style, label=label, markersize=4)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on synthetic AMR: accuracy vs SNR")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("", "original", "compressed", "compressed/original")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [head, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratio_row(label: str, before: float, after: float, fmt: str) -> tuple[str, str, str, str]:
    return label, fmt.format(before), fmt.format(after), f"x{after / before:.3f}"


def _points_row(label: str, before: float, after: float) -> tuple[str, str, str, str]:
    return label, f"{before:.2%}", f"{after:.2%}", f"{100 * (after - before):+.2f} points"


if __name__ == "__main__":
    raise SystemExit(main())
