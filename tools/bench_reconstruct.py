"""Least-squares reconstruction after structured channel pruning: accuracy before and after a short fine-tune.

    python tools/bench_reconstruct.py [--quick] [--json out.jsonl] [--write-md docs/results/reconstruct.md]

Models (trained once with fxslim.zoo.train.train_baseline and cached, the settings of tools/train.py):
ResNet-20 and VGG-BN on scikit-learn digits (1×8×8). Each is cut by `prune_channels(ratio)` (L1, every
prunable group) at 30/50/70%, then:

- `cut`: nothing else;
- `cut + BN recal`: `bn_recalibrate` (16 batches), the usual repair;
- `reconstruct`: `prune_channels(reconstruct=True, calib_batches=8)`: every conv/linear whose inputs lost
  channels re-fit by least squares to the unpruned layer's outputs on 8 training batches (`fxslim.reconstruct`);
- `reconstruct + BN recal`: both.

Each model is scored on the test split as cut (no training) and after `finetune` (Adam 1e-3, KD from the
unpruned model at T=4) for `--ft-epochs` epochs, once per seed (the seed draws the order of the training
samples in every epoch):
mean and per-seed accuracy, the pass's CPU seconds, MACs. The same cut (same channels) in every variant.
--quick: ResNet-20 at 50%, one seed, one fine-tune epoch."""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench_io import write_outputs  # noqa: E402

import fxslim  # noqa: E402
from fxslim.graph.cost import count  # noqa: E402
from fxslim.zoo.train import TrainConfig, evaluate, train_baseline  # noqa: E402

CONFIG = TrainConfig(epochs=20, patience=5)  # the settings of tools/train.py: its checkpoints are reused
MODELS = ("resnet20", "vgg_bn")
RATIOS = (0.3, 0.5, 0.7)
VARIANTS = {  # name -> (reconstruct, bn_recalibrate)
    "cut": (False, False),
    "cut + BN recal": (False, True),
    "reconstruct": (True, False),
    "reconstruct + BN recal": (True, True),
}
CALIB_BATCHES, BN_BATCHES = 8, 16


class Shuffled:
    """The samples of `batches` reshuffled into batches of the same size on every pass over them (what a
    DataLoader with shuffle=True and a seeded generator gives the finetune pass), the order drawn from
    (seed, pass number)."""

    def __init__(self, batches: list, seed: int) -> None:
        self.x, self.y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        self.size, self.seed, self.epoch = len(batches[0][1]), seed, 0

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(1000 * self.seed + self.epoch))
        self.epoch += 1
        for i in range(0, len(order), self.size):
            yield self.x[order[i : i + self.size]], self.y[order[i : i + self.size]]


def recipe(ratio: float, reconstruct: bool, recal: bool) -> list[dict]:
    steps: list[dict] = [{"pass": "prune_channels", "ratio": ratio}]
    if reconstruct:
        steps[0].update(reconstruct=True, calib_batches=CALIB_BATCHES)
    if recal:
        steps.append({"pass": "bn_recalibrate", "calib_batches": BN_BATCHES})
    return steps


def run_model(name: str, ratios, seeds, ft_epochs: int, bar) -> tuple[list[dict], dict]:
    trained = train_baseline(name, "digits", model_kwargs={"in_ch": 1}, config=CONFIG)
    ds, model = trained.dataset, trained.model.eval()
    x1 = ds.example(1)
    base_acc = evaluate(model, ds)["accuracy"]
    base_macs = count(model, (x1,)).macs
    rows = []
    for ratio in ratios:
        for variant, (recon, recal) in VARIANTS.items():
            c0 = time.process_time()
            res = fxslim.compress(model, (x1,), recipe(ratio, recon, recal), data=ds.train)
            cpu = time.process_time() - c0
            cut = res.module
            after = []
            for seed in seeds:
                ft = [{"pass": "finetune", "epochs": ft_epochs, "lr": 1e-3, "kd_temperature": 4.0}]
                tuned = fxslim.compress(cut, (x1,), ft, data=Shuffled(ds.train, seed), seed=seed).module
                after.append(evaluate(tuned, ds)["accuracy"])
                bar.update()
            rec = res.report[0].details.get("reconstructed", [])
            rows.append(
                {
                    "model": name,
                    "ratio": ratio,
                    "variant": variant,
                    "macs_ratio": count(cut, (x1,)).macs / base_macs,
                    "acc_cut": evaluate(cut, ds)["accuracy"],
                    "acc_ft": statistics.mean(after),
                    "acc_ft_seeds": after,
                    "compress_cpu_s": cpu,
                    "refit_layers": sum("skipped" not in r for r in rec),
                    "skipped_layers": [r for r in rec if "skipped" in r],
                }
            )
            tqdm.write(
                f"{name} {ratio:.0%} {variant:24s} cut {rows[-1]['acc_cut']:.4f} "
                f"ft {rows[-1]['acc_ft']:.4f} ({cpu:.1f} s)"
            )
    return rows, {"model": name, "baseline_acc": base_acc, "baseline_macs": base_macs}


def table(rows: list[dict], infos: list[dict], ft_epochs: int, n_seeds: int) -> str:
    base = {i["model"]: i["baseline_acc"] for i in infos}
    head = [
        "model",
        "ratio",
        "variant",
        "MACs vs base",
        "acc cut %",
        f"acc after {ft_epochs}-ep FT % (mean of {n_seeds})",
        "drop after FT (pt)",
        "per seed",
        "pass CPU s",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    f"{r['ratio']:.0%}",
                    r["variant"],
                    f"{r['macs_ratio']:.2f}",
                    f"{100 * r['acc_cut']:.2f}",
                    f"{100 * r['acc_ft']:.2f}",
                    f"{100 * (base[r['model']] - r['acc_ft']):+.2f}",
                    ", ".join(f"{100 * a:.2f}" for a in r["acc_ft_seeds"]),
                    f"{r['compress_cpu_s']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 at 50%%, one seed, one fine-tune epoch")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--json", help="append one JSON line of all figures to this file")
    p.add_argument("--write-md", help="write the results table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    models = ["resnet20"] if args.quick else args.models.split(",")
    ratios = [0.5] if args.quick else [float(r) for r in args.ratios.split(",")]
    seeds = [0] if args.quick else list(range(args.seeds))
    ft_epochs = 1 if args.quick else args.ft_epochs
    t0 = time.perf_counter()
    rows, infos = [], []
    bar = tqdm(total=len(models) * len(ratios) * len(VARIANTS) * len(seeds), desc="fine-tunes", disable=None)
    for name in models:
        r, info = run_model(name, ratios, seeds, ft_epochs, bar)
        rows += r
        infos.append(info)
    bar.close()
    wall = time.perf_counter() - t0
    text = table(rows, infos, ft_epochs, len(seeds))
    print(text)
    print(f"wall {wall:.0f} s")
    command = "python tools/bench_reconstruct.py " + " ".join(argv if argv is not None else sys.argv[1:])
    figures = {
        "bench": "reconstruct",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command.strip(),
        "quick": args.quick,
        "ft_epochs": ft_epochs,
        "seeds": seeds,
        "infos": infos,
        "rows": rows,
        "wall_s": wall,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    write_outputs(figures, args.json, args.write_md, markdown(figures, text))
    return 0


def markdown(figures: dict, text: str) -> str:
    bases = ", ".join(f"{i['model']} {100 * i['baseline_acc']:.2f}%" for i in figures["infos"])
    return "\n".join(
        [
            "# Least-squares reconstruction after channel pruning",
            "",
            f"`{figures['command']}` on {figures['date']} ({figures['machine']}), wall {figures['wall_s']:.0f} s.",
            f"Baselines (digits test split, 360 images, 1 image = 0.28 pt): {bases}.",
            "",
            text,
            "",
            "- *cut*: `prune_channels(ratio)` alone (L1 importance, every prunable group loses `ratio`).",
            f"- *BN recal*: `bn_recalibrate` on {BN_BATCHES} training batches after the cut.",
            f"- *reconstruct*: `prune_channels(reconstruct=True, calib_batches={CALIB_BATCHES})`: each conv/linear"
            " whose inputs lost channels is re-fit, in graph order, by least squares (ridge 1e-3 × mean"
            " diagonal, 16 sampled positions per image) to the unpruned layer's outputs (`fxslim.reconstruct`;"
            " He et al. 2017, ThiNet). Same channels removed as *cut*.",
            f"- Fine-tune: the `finetune` pass, {figures['ft_epochs']} epoch(s), Adam 1e-3, KD from the unpruned"
            " model (T=4), one run per seed.",
            "- *pass CPU s*: process CPU seconds of `fxslim.compress` for the cut (+ re-fit, + recalibration).",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
