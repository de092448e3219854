"""Train zoo baselines (cached) and report accuracy and training time.

    python tools/train.py --models cnn1d,resnet20_1d,resnet56_1d --data amr [--epochs 20] [--quick] [--force]

Each model is trained with fxslim.zoo.train.train_baseline (the FCOS paper's AMR setup by default: Adam 1e-3,
StepLR(10, 0.8), batch 128, early stopping on a validation split) or loaded from the checkpoint cache
(`$FXSLIM_CACHE/checkpoints`, default ~/.cache/fxslim/checkpoints). Prints a table and appends one JSON
line per model to --json. --quick: a small data set and 2 epochs (a smoke run in about a minute)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fxslim.zoo.train import TrainConfig, train_baseline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn1d,resnet20_1d,resnet56_1d")
    p.add_argument("--data", default="amr", help="amr | digits | mnist1d | rotated_digits")
    p.add_argument("--n-per-class-snr", type=int, default=100, help="AMR frames per (class, SNR)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force", action="store_true", help="retrain even when a checkpoint is cached")
    p.add_argument("--json", default=None, help="append one JSON line per model to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, n = (2, 12) if args.quick else (args.epochs, args.n_per_class_snr)
    config = TrainConfig(epochs=epochs, patience=args.patience, seed=args.seed)
    data_kwargs = {"n_per_class_snr": n} if args.data == "amr" else {}
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        r = train_baseline(name, args.data, data_kwargs=data_kwargs, config=config, force=args.force)
        ev = r.info["eval"]
        row = {"model": name, "data": args.data, "data_kwargs": data_kwargs, "epochs_run": r.info["record"]["epochs"],
               "accuracy": ev["accuracy"], "accuracy_snr_ge10": ev.get("accuracy_snr_ge10"),
               "train_seconds": r.info["train_seconds"], "cached": r.cached, "threads": args.threads,
               "wall_seconds": time.perf_counter() - t0, "checkpoint": str(r.path)}
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'model':<14}{'epochs':>7}{'accuracy':>10}{'acc SNR>=10':>13}{'train s':>9}  cached")
    for r in rows:
        hi = "-" if r["accuracy_snr_ge10"] is None else f"{r['accuracy_snr_ge10']:.2%}"
        print(f"{r['model']:<14}{r['epochs_run']:>7}{r['accuracy']:>10.2%}{hi:>13}"
              f"{r['train_seconds']:>9.0f}  {r['cached']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
