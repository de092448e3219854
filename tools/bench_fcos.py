"""FCOS benchmark on the synthetic AMR set: channel fusion + LaCD against pruning peers at matched MACs.

For each model (CNN1D, ResNet-56-1D by default) it trains (or loads the cached) baseline, then for each
epsilon runs, all in the same process and with the same fine-tune budget (`short + long` epochs, Adam 1e-3,
StepLR(10, 0.8) as in the FCOS paper):

- `fcos`:         fcos_fuse(epsilon) → finetune(short) → lacd_drop(beta) → finetune(long)  (the paper's pipeline)
- `fcos_nolacd`:  fcos_fuse(epsilon) → finetune(short) → finetune(long)                   (same, LaCD left out)
- `l1`:           our prune_channels (L1 magnitude), ratio bisected to the MACs `fcos` reached
- `tp_l1`:        Torch-Pruning's MagnitudePruner (L1), ratio bisected to the same MACs (benchmark-only peer)
- `scratch`:      the `fcos` architecture re-initialised and trained from random init with the same budget

and reports params and MACs (ratios to the baseline), accuracy overall and at SNR >= 10 dB, and the
onnxruntime latency ratio to the baseline (process CPU time, one thread, interleaved; batch 1 and batch 64).
It plots accuracy vs MACs and LaCD's probe accuracy per block. Measurement only: no compression logic here.

    python tools/bench_fcos.py --quick         # a few minutes: small data, two epsilons; plots in runs/fcos/
    python tools/bench_fcos.py --json runs/fcos/fcos.jsonl \
        --write-md docs/results/fcos.md --plot-prefix docs/fcos   # the docs' page and figures
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import pyplot, run_path, save_figure, write_outputs  # noqa: E402

import fxslim  # noqa: E402
from fxslim.export import ort_latency  # noqa: E402
from fxslim.zoo.train import TrainConfig, evaluate, train_baseline  # noqa: E402

METHODS = ("fcos", "fcos_nolacd", "l1", "tp_l1", "scratch")
LABELS = {
    "fcos": "FCOS (fuse + LaCD)",
    "fcos_nolacd": "FCOS without LaCD",
    "l1": "fxslim prune_channels L1",
    "tp_l1": "Torch-Pruning magnitude L1",
    "scratch": "same arch, random init",
}
FULL = {"models": ["cnn1d", "resnet56_1d"], "epsilons": [0.5, 0.75, 0.9, 0.95, 0.99], "n": 100,
        "base_epochs": 20, "short": 2, "long": 8, "calib_samples": 1024, "latency_budget": 1.0}
QUICK = {"models": ["cnn1d"], "epsilons": [0.5, 0.9], "n": 12, "base_epochs": 2, "short": 1, "long": 1,
         "calib_samples": 256, "latency_budget": 0.2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, CNN1D only, epsilons 0.5 and 0.9, 1+1 epochs")
    p.add_argument("--models", help="comma-separated zoo models (default cnn1d,resnet56_1d)")
    p.add_argument("--epsilons", help="comma-separated fusion ratios (default 0.5,0.75,0.9,0.95,0.99)")
    p.add_argument("--n-per-class-snr", type=int, help="AMR frames per (class, SNR) (default 100)")
    p.add_argument("--short", type=int, help="epochs of the short fine-tune (default 2; the paper: 20)")
    p.add_argument("--long", type=int, help="epochs of the long fine-tune (default 8; the paper: 80)")
    p.add_argument("--beta", type=float, default=0.005, help="LaCD gain threshold (default 0.005)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append one JSON line of all figures to this file")
    p.add_argument("--write-md", help="write the results table to this markdown file")
    p.add_argument("--profile", action="store_true", help="run nothing else: onnxruntime profiles (kernel time "
                   "per op type vs per-run overhead) of each baseline and its fcos_fuse architecture at each epsilon")
    p.add_argument("--render", help="run nothing: merge the JSON lines of this file (e.g. one run per model) "
                   "into the plots and --write-md table")
    p.add_argument("--plot-prefix", default=str(run_path("fcos", "fcos")),
                   help="PNG path prefix (default %(default)s; docs/fcos: the docs' figures)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key, value in (("models", args.models), ("epsilons", args.epsilons)):
        if value:
            cfg[key] = [float(v) if key == "epsilons" else v for v in value.split(",")]
    for key in ("n_per_class_snr", "short", "long"):
        if getattr(args, key) is not None:
            cfg["n" if key == "n_per_class_snr" else key] = getattr(args, key)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    if "tp_l1" in methods and not _has_torch_pruning():
        p.error("tp_l1 needs the Torch-Pruning package: make bench-install (or drop it with --methods)")
    torch.set_num_threads(1)  # small 1-D nets: one thread is much faster than two on a shared 2-core machine

    if args.profile:
        prof = {"bench": "fcos", "profile": [r for m in cfg["models"] for r in profile_model(m, cfg, args.seed)]}
        print(profile_table(prof["profile"]))
        write_outputs(prof, args.json, None, None)
        return 0
    if args.render:
        lines = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        figures = merged([fig for fig in lines if "rows" in fig])
        figures["profile"] = [r for fig in lines for r in fig.get("profile", [])]
    else:
        start = time.perf_counter()
        rows, probes = [], []
        for model in cfg["models"]:
            r, pr = bench_model(model, cfg, methods, args.beta, args.seed)
            rows += r
            probes += pr
        figures = {"bench": "fcos", "date": datetime.date.today().isoformat(), "quick": args.quick, "config": cfg,
                   "beta": args.beta, "methods": methods, "rows": rows, "probes": probes,
                   "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
                   "machine": platform.machine()}
    wall = figures["wall_seconds"]
    print(table(figures["rows"]))
    rows, probes = figures["rows"], figures["probes"]
    plots = plot_accuracy_vs_macs(rows, Path(f"{args.plot_prefix}_accuracy_vs_macs.png")), plot_probes(
        probes, Path(f"{args.plot_prefix}_lacd_probes.png"))
    print(f"plots: {', '.join(str(p) for p in plots)}; wall {wall:.0f} s")
    md = markdown(figures, plots, args.write_md) if args.write_md else None
    write_outputs(figures, None if args.render else args.json, args.write_md, md)
    return 0


def bench_model(name: str, cfg: dict, methods: list[str], beta: float, seed: int) -> tuple[list[dict], list[dict]]:
    config = TrainConfig(epochs=cfg["base_epochs"], patience=5, seed=seed)
    base = train_baseline(name, "amr", data_kwargs={"n_per_class_snr": cfg["n"]}, config=config)
    ds, x = base.dataset, base.dataset.example()
    base_cost = fxslim.count(base.model, (x,))
    base_eval = evaluate(base.model, ds)
    print(f"{name}: baseline accuracy {base_eval['accuracy']:.2%} (>= 10 dB {base_eval['accuracy_snr_ge10']:.2%}), "
          f"{base_cost.params:,} params, {base_cost.macs:,} MACs ({'cached' if base.cached else 'trained'})")
    ft = {"lr": 1e-3, "scheduler": "step", "step_size": 10, "gamma": 0.8}
    budget = cfg["short"] + cfg["long"]

    def compress(model: nn.Module, recipe: list) -> fxslim.CompressResult:
        return fxslim.compress(model, (x,), recipe, data=ds.train, seed=seed)

    rows, probes = [], []
    for eps in tqdm(cfg["epsilons"], desc=f"{name} epsilons", disable=None):
        models, details = {}, {}
        t0 = time.perf_counter()
        stage1 = compress(base.model, [{"pass": "fcos_fuse", "epsilon": eps},
                                       {"pass": "finetune", "epochs": cfg["short"], **ft}])
        # FCOS always runs: its final MACs are the target the peers are matched to.
        res = compress(stage1.module, [{"pass": "lacd_drop", "beta": beta, "calib_samples": cfg["calib_samples"]},
                                       {"pass": "finetune", "epochs": cfg["long"], **ft}])
        lacd = res.report[0].details
        models["fcos"] = res.module
        details["fcos"] = {"seconds": time.perf_counter() - t0, "dropped": [d["block"] for d in lacd["dropped"]]}
        probes.append({"model": name, "epsilon": eps, "input": lacd.get("input_probe_accuracy"),
                       "probes": lacd["probes"], "dropped": details["fcos"]["dropped"]})
        if "fcos_nolacd" in methods:
            t0 = time.perf_counter()
            models["fcos_nolacd"] = compress(stage1.module, [{"pass": "finetune", "epochs": cfg["long"], **ft}]).module
            details["fcos_nolacd"] = {"seconds": time.perf_counter() - t0}
        target = fxslim.count(models["fcos"], (x,)).macs
        if "l1" in methods:
            ratio = match_macs(lambda r: compress(base.model, [{"pass": "prune_channels", "ratio": r}]).module,
                               target, x)
            pruned = compress(base.model, [{"pass": "prune_channels", "ratio": ratio}]).module
            models["l1"] = compress(pruned, [{"pass": "finetune", "epochs": budget, **ft}]).module
            details["l1"] = {"ratio": ratio}
        if "tp_l1" in methods:
            ratio = match_macs(lambda r: tp_prune(base.model, x, r), target, x)
            models["tp_l1"] = compress(tp_prune(base.model, x, ratio), [{"pass": "finetune", "epochs": budget, **ft}]
                                       ).module
            details["tp_l1"] = {"ratio": ratio}
        if "scratch" in methods:
            models["scratch"] = compress(reinitialised(models["fcos"], seed),
                                         [{"pass": "finetune", "epochs": budget, **ft}]).module
        if "fcos" not in methods:
            del models["fcos"]
        latency = measure_latency({"baseline": base.model, **models}, ds, cfg["latency_budget"])
        for method, m in models.items():
            cost, ev = fxslim.count(m, (x,)), evaluate(m, ds)
            rows.append({
                "model": name, "epsilon": eps, "method": method, "params": cost.params, "macs": cost.macs,
                "params_ratio": cost.params / base_cost.params, "macs_ratio": cost.macs / base_cost.macs,
                "accuracy": ev["accuracy"], "accuracy_snr_ge10": ev["accuracy_snr_ge10"],
                "base_accuracy": base_eval["accuracy"], "base_accuracy_snr_ge10": base_eval["accuracy_snr_ge10"],
                "ort_ratio_b1": latency[1][method] / latency[1]["baseline"],
                "ort_ratio_b64": latency[64][method] / latency[64]["baseline"],
                "ort_baseline_us_b1": latency[1]["baseline"] * 1e6, "per_snr": ev["per_snr"], **details.get(method, {}),
            })
    return rows, probes


def profile_model(name: str, cfg: dict, seed: int) -> list[dict]:
    """Where onnxruntime's time goes, baseline vs the fused architecture (weights do not change dense kernels'
    time, so fcos_fuse without fine-tuning has the architecture and the latency of the trained one)."""
    from fxslim.export import ort_profile

    config = TrainConfig(epochs=cfg["base_epochs"], patience=5, seed=seed)
    base = train_baseline(name, "amr", data_kwargs={"n_per_class_snr": cfg["n"]}, config=config)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in cfg["epsilons"]:
            fused = fxslim.compress(base.model, (base.dataset.example(),), [{"pass": "fcos_fuse", "epsilon": eps}])
            macs = fused.report[0].macs_after / fused.report[0].macs_before
            for batch in (1, 64):
                x = (base.dataset.example(batch),)
                row = {"model": name, "epsilon": eps, "batch": batch, "macs_ratio": macs}
                for tag, m in (("base", base.model), ("fused", fused.module)):
                    path = Path(tmp) / f"{tag}.onnx"
                    fxslim.export_onnx(m, x, path)
                    row[tag] = ort_profile(path, x, runs=200 if batch == 1 else 20)
                out.append(row)
    return out


def profile_table(rows: list[dict]) -> str:
    head = ["model", "ε", "batch", "MACs", "run µs base → fused", "kernels µs", "overhead µs", "kernel ratio",
            "run ratio", "top ops fused (µs)"]
    lines = []
    for r in rows:
        b, f = r["base"], r["fused"]
        top = ", ".join(f"{op} {us:.0f}" for op, us in list(f["ops_us"].items())[:3])
        lines.append([r["model"], f"{r['epsilon']:.2f}", str(r["batch"]), f"x{r['macs_ratio']:.4f}",
                      f"{b['run_us']:.0f} → {f['run_us']:.0f}", f"{b['kernel_us']:.0f} → {f['kernel_us']:.0f}",
                      f"{b['overhead_us']:.0f} → {f['overhead_us']:.0f}", f"x{f['kernel_us'] / b['kernel_us']:.3f}",
                      f"x{f['run_us'] / b['run_us']:.3f}", top])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(c) + " |" for c in lines])


def merged(runs: list[dict]) -> dict:
    """Several runs' figures as one (rows and probes concatenated and ordered by model, then epsilon; wall
    times summed; the last run's config), e.g. one run per model or per group of epsilons."""
    out = dict(runs[-1])
    models = list(dict.fromkeys(m for run in runs for m in run["config"]["models"]))

    def order(r: dict) -> tuple[int, float]:
        return models.index(r["model"]), r["epsilon"]

    out["rows"] = sorted((r for run in runs for r in run["rows"]), key=order)  # stable: method order kept
    out["probes"] = sorted((p for run in runs for p in run["probes"]), key=order)
    out["wall_seconds"] = sum(run["wall_seconds"] for run in runs)
    out["config"] = {**runs[-1]["config"], "models": models}
    return out


def match_macs(prune: Callable[[float], nn.Module], target: int, x: torch.Tensor, steps: int = 14) -> float:
    """The pruning ratio whose MACs come closest to `target` (bisection on the monotone MACs(ratio) curve)."""
    lo, hi, best = 0.0, 0.995, (float("inf"), 0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        macs = fxslim.count(prune(mid), (x,)).macs
        best = min(best, (abs(macs - target), mid))
        lo, hi = (mid, hi) if macs > target else (lo, mid)
    return best[1]


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """Torch-Pruning's L1 magnitude pruner at a uniform per-layer ratio, classifier kept (its documented use)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[head])
    pruner.step()
    return m


def reinitialised(module: nn.Module, seed: int) -> nn.Module:
    """A copy with every parameter re-drawn by its layer's own initialiser (BN statistics reset too)."""
    m = copy.deepcopy(module)
    torch.manual_seed(seed)
    for sub in m.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return m


def measure_latency(models: dict[str, nn.Module], ds, budget_s: float) -> dict[int, dict[str, float]]:
    """ORT seconds per run of each model at batch 1 and 64 (files exported per batch size, timed interleaved)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 64):
            inputs = (ds.example(batch),)
            paths = {name: Path(tmp) / f"{name}-b{batch}.onnx" for name in models}
            for name, m in models.items():
                fxslim.export_onnx(m, inputs, paths[name])
            out[batch] = ort_latency(paths, inputs, budget_s=budget_s)
    return out


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


HEAD = ["model", "ε", "method", "params", "MACs", "acc %", "Δ pts", "≥10 dB %", "Δ pts", "ORT b1", "ORT b64"]


def cells(r: dict) -> list[str]:
    """One result row as printed: ratios to the baseline, accuracy and its change in points."""
    return [
        r["model"], f"{r['epsilon']:.2f}", r["method"], f"x{r['params_ratio']:.4f}", f"x{r['macs_ratio']:.4f}",
        f"{100 * r['accuracy']:.2f}", f"{100 * (r['accuracy'] - r['base_accuracy']):+.2f}",
        f"{100 * r['accuracy_snr_ge10']:.2f}", f"{100 * (r['accuracy_snr_ge10'] - r['base_accuracy_snr_ge10']):+.2f}",
        f"x{r['ort_ratio_b1']:.3f}", f"x{r['ort_ratio_b64']:.3f}",
    ]


def table(rows: list[dict]) -> str:
    lines = [cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(HEAD, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*HEAD), "-" * (sum(widths) + 2 * len(widths)), *(fmt.format(*r) for r in lines)])


def plot_accuracy_vs_macs(rows: list[dict], path: Path) -> Path:
    plt = pyplot()

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["macs_ratio"], 100 * r["accuracy"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), "o-", label=LABELS[method], markersize=4)
        ax.axhline(100 * mine[0]["base_accuracy"], color="k", ls=":", label="baseline")
        ax.set_xscale("log")
        ax.set_xlabel("MACs after / before (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}, synthetic AMR")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_probes(probes: list[dict], path: Path) -> Path:
    """LaCD's linear-probe accuracy at each candidate block (after the short fine-tune), dropped blocks marked."""
    plt = pyplot()

    models = list(dict.fromkeys(p["model"] for p in probes))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for p in (p for p in probes if p["model"] == model):
            accs = [p["input"]] + [q["accuracy"] for q in p["probes"]]
            line, = ax.plot(range(len(accs)), [100 * a for a in accs], ".-", label=f"ε={p['epsilon']}")
            drops = [i + 1 for i, q in enumerate(p["probes"]) if q["block"] in p["dropped"]]
            ax.plot(drops, [100 * accs[i] for i in drops], "x", color=line.get_color(), markersize=8)
        ax.set_xlabel("probe position (0 = input, then each candidate block)")
        ax.set_ylabel("linear-probe accuracy (%)")
        ax.set_title(f"{model}: LaCD probes (x = dropped)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def markdown(fig: dict, plots: tuple[Path, ...], md_path: str) -> str:
    cfg = fig["config"]
    out = [
        "# FCOS on the synthetic AMR set",
        "",
        f"`python tools/bench_fcos.py{' --quick' if fig['quick'] else ''}` on {fig['date']} "
        f"(torch {fig['torch']}, 2-core CPU, one thread), wall {fig['wall_seconds'] / 60:.0f} min. Data: synthetic "
        f"RadioML-like I/Q frames (fxslim.zoo.amr), {cfg['n']} frames per (class, SNR), SNR -20..18 dB. Baselines: "
        f"{cfg['base_epochs']} epochs max (early stopping). Every method gets the same fine-tune budget of "
        f"{cfg['short']} + {cfg['long']} epochs (Adam 1e-3, StepLR(10, 0.8)); FCOS spends it as short → LaCD (β = "
        f"{fig['beta']}) → long, the peers in one run at MACs matched to FCOS's by bisection of their ratio. ORT: "
        "onnxruntime process CPU time per run, one thread, interleaved with the baseline, as a ratio to it.",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
        *("| " + " | ".join(cells(r)) + " |" for r in fig["rows"]),
        "",
        *(f"![{p.stem}]({os.path.relpath(p.resolve(), Path(md_path).resolve().parent)})" for p in plots),
        "",
    ]
    if fig.get("profile"):
        out += ["## Where onnxruntime's time goes (`python tools/bench_fcos.py --profile`)", "",
                "onnxruntime's own profiler, one thread: per-run time split into the kernels' time and the rest "
                "(dispatch, allocation, copies between kernels), baseline → fcos_fuse architecture.", "",
                profile_table(fig["profile"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
