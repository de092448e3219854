"""`python -m fxslim.demo [--quick]` (what `make demo` runs): the whole pipeline on a model small enough for
a laptop CPU. It trains DigitsResNet on scikit-learn's digits, compresses it with
prune_channels → finetune → fold_bn, writes the IR dumps and an ONNX file checked in onnxruntime, and
compares the original and compressed models on accuracy, params, MACs and onnxruntime latency. Every
number it prints is measured in this run; nothing is read from a file. It only uses the public API and
the zoo: it must never contain compression logic of its own."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fxslim
from fxslim.zoo.data import Batches, digits_loaders
from fxslim.zoo.models import DigitsResNet

RECIPE = [
    {"pass": "prune_channels", "ratio": 0.5, "importance": "l1"},
    {"pass": "finetune", "epochs": 5},
    "fold_bn",
]


def train(model: nn.Module, batches: Batches, epochs: int, seed: int, lr: float = 3e-3) -> None:
    """Adam on cross entropy; the training samples are reshuffled every epoch (seeded)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    batch_size = len(batches[0][1])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(epochs), desc="train DigitsResNet", unit="epoch")
    for _ in bar:
        order = torch.randperm(len(y), generator=g)
        total, correct = 0.0, 0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        bar.set_postfix(loss=f"{total / len(y):.4f}", acc=f"{correct / len(y):.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def ort_latency(paths: dict[str, Path], x: np.ndarray, reps: int, inner: int) -> dict[str, float]:
    """Median CPU seconds per batch-1 run for each ONNX file: one intra-op thread, `time.process_time`,
    the models interleaved (A B, then B A, ...) so that drift hits both alike; each sample is the mean
    over `inner` consecutive runs."""
    from fxslim.export import ort_run, ort_session

    sessions = {name: ort_session(path, threads=1) for name, path in paths.items()}
    for s in sessions.values():  # warm-up: first runs allocate buffers
        for _ in range(inner):
            ort_run(s, x)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.process_time()
            for _ in range(inner):
                ort_run(sessions[name], x)
            samples[name].append((time.process_time() - t0) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fxslim.demo",
        description="Train DigitsResNet on scikit-learn's digits, compress it (prune_channels 50% -> "
        "finetune -> fold_bn), export to ONNX and compare accuracy, size and onnxruntime latency.",
        epilog="example: python -m fxslim.demo --quick   (outputs go to out/demo/)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing repetitions (a smoke run)")
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One thread: these layers are tiny, and on a busy 2-core machine two OpenMP threads ran an epoch
    # 5-12x slower than one (measured: 0.6-1.3 s vs 5.1-7.5 s per epoch).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(args)
    finally:
        torch.set_num_threads(threads)


def run_demo(args: argparse.Namespace) -> int:
    epochs, finetune_epochs, reps, inner = (3, 1, 10, 50) if args.quick else (15, 5, 41, 200)
    out = Path(args.out)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    train_batches, test_batches = digits_loaders(batch_size=64, seed=args.seed)
    print(
        f"data: scikit-learn digits, {sum(len(y) for _, y in train_batches)} train / "
        f"{sum(len(y) for _, y in test_batches)} test images of 1x8x8"
    )
    model = DigitsResNet()
    train(model, train_batches, epochs, args.seed)
    acc_before = accuracy(model, test_batches)
    print(f"test accuracy of the trained model: {acc_before:.2%}")

    recipe = [dict(RECIPE[0]), {**RECIPE[1], "epochs": finetune_epochs}, RECIPE[2]]
    x = test_batches[0][0][:1]
    print(f"\nfxslim.compress with recipe {recipe}")
    res = fxslim.compress(model, (x,), recipe, data=train_batches, dump_dir=out / "ir", seed=args.seed)
    print(res.summary())
    acc_after = accuracy(res.module, test_batches)
    print(f"test accuracy after compression: {acc_after:.2%}")
    print(f"IR dumps: {', '.join(sorted(p.name for p in (out / 'ir').glob('*.txt')))} in {out / 'ir'}/")

    paths = {"original": out / "original.onnx", "compressed": out / "model.onnx"}
    err_original = fxslim.export_onnx(model, (x,), paths["original"])
    err_compressed = fxslim.export_onnx(res.module, (x,), paths["compressed"])
    print(
        f"ONNX: {paths['compressed']} (onnxruntime vs PyTorch max abs error {err_compressed:.2e}); "
        f"original model: {paths['original']} (error {err_original:.2e})"
    )
    latency = ort_latency(paths, x.numpy(), reps, inner)

    first, last = res.report[0], res.report[-1]
    size = {name: path.stat().st_size / 1024 for name, path in paths.items()}
    rows = [
        ("test accuracy", f"{acc_before:.2%}", f"{acc_after:.2%}", f"{acc_after - acc_before:+.2%} (points)"),
        _ratio_row("params", first.params_before, last.params_after, "{:,}"),
        _ratio_row("MACs (batch 1)", first.macs_before, last.macs_after, "{:,}"),
        _ratio_row(
            "ORT latency, us (batch 1, 1 thread)", latency["original"] * 1e6, latency["compressed"] * 1e6, "{:.1f}"
        ),
        _ratio_row("ONNX file, KB", size["original"], size["compressed"], "{:.1f}"),
    ]
    print(f"\nsummary (latency: median of {reps} interleaved samples of {inner} runs, CPU time via time.process_time)")
    print(summary_table(rows))
    print(f"\ndone in {time.perf_counter() - start:.1f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
