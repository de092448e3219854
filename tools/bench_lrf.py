"""Low-rank factorisation benchmark: each LRF method alone, uniform rank, the hybrid, and tensorly-torch.

    python tools/bench_lrf.py [--quick] [--similarity 0.92] [--json out.jsonl] [--write-md docs/results/lrf.md]

Models (baselines trained once and cached by fxslim.zoo.train.train_baseline): ResNet-20 and VGG-BN on
scikit-learn digits (8×8 images, 1 channel) and ResNet-20-1D on synthetic AMR (a smaller set through
`n_per_class_snr`, see --amr-frames). Per model, in the same run:
  * tucker / cp / tt: `lowrank_conv` with that method, ranks by feature-map similarity (`--similarity`);
  * hybrid: `lowrank_conv` method="auto", objective="flops" (per layer the cheapest method meeting it);
  * uniform: Tucker-2 at rank fraction `--uniform-rank` of every layer (no search);
  * tltorch: tensorly-torch `FactorizedConv` (Tucker, factorized forward) at the ranks our Tucker search
    chose, layer by layer (the peer at the same ranks), when tensorly-torch is installed.
Every variant then gets the same one-shot fine-tune (fxslim.training.fit, `--ft-epochs`, Adam 1e-3,
distillation from the baseline at T=4). Reported: params, MACs (fxslim.count; tltorch through
torch.utils.flop_counter, FLOPs/2), test accuracy before and after fine-tuning, ORT latency at batch 1
(fxslim.export.ort_latency: process CPU time, one thread, all variants of a model interleaved), and the
seconds spent in the rank search. Prints a table, appends JSON lines, writes a markdown page and a chart of
the hybrid's per-layer choices (docs/lrf_methods.png). --quick: fewer AMR frames, calibration samples and
fine-tune epochs."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import fxslim  # noqa: E402
from fxslim.export import ort_latency  # noqa: E402
from fxslim.pass_api import PassContext  # noqa: E402
from fxslim.passes import lowrank_conv  # noqa: E402
from fxslim.training import fit  # noqa: E402
from fxslim.zoo.train import TrainConfig, evaluate, train_baseline  # noqa: E402

MODELS = [  # name, zoo model, dataset, model kwargs
    ("ResNet-20 (digits)", "resnet20", "digits", {"in_ch": 1}),
    ("VGG-BN (digits)", "vgg_bn", "digits", {"in_ch": 1}),
    ("ResNet-20-1D (AMR)", "resnet20_1d", "amr", {}),
]
VARIANTS = ["tucker", "cp", "tt", "hybrid", "uniform", "tltorch"]
METHOD_COLORS = {"tucker": "tab:blue", "cp": "tab:orange", "tt": "tab:green", "kept": "lightgray"}


def factorise(gm, x, data, variant: str, args) -> tuple[torch.nn.Module, dict]:
    ctx = PassContext(example_inputs=(x,), data=data)
    opts = {"similarity": args.similarity, "calib_samples": args.calib, "cp_iterations": args.cp_iterations}
    if variant == "hybrid":
        res = lowrank_conv.run(gm, ctx, method="auto", objective="flops", **opts)
    elif variant == "uniform":
        res = lowrank_conv.run(gm, ctx, method="tucker", rank=args.uniform_rank)
    else:
        res = lowrank_conv.run(gm, ctx, method=variant, **opts)
    return res.module, res.record


def tltorch_at(model: torch.nn.Module, tucker_record: dict) -> torch.nn.Module | None:
    """The baseline model with each conv our Tucker search factorised replaced by tltorch's Tucker
    FactorizedConv at the same channel ranks (spatial modes kept full)."""
    try:
        import tltorch
    except ImportError:
        print("tensorly-torch is not installed (make bench-install): skipping the tltorch baseline", file=sys.stderr)
        return None
    new = copy.deepcopy(model)
    for rec in tucker_record["layers"]:
        conv = new.get_submodule(rec["target"])
        r_out, r_in = rec["ranks"]
        rank = (r_out, r_in, *conv.kernel_size)
        fact = tltorch.FactorizedConv.from_conv(
            conv, rank=rank, factorization="tucker", implementation="factorized", decompose_weights=True
        )
        parent, _, attr = rec["target"].rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, attr, fact)
    return new


def macs_of(module: torch.nn.Module, x: torch.Tensor, variant: str) -> int:
    if variant != "tltorch":
        return fxslim.count(module, (x,)).macs
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2


def run_model(label: str, zoo: str, dataset: str, kwargs: dict, args) -> list[dict]:
    data_kwargs = {"n_per_class_snr": args.amr_frames} if dataset == "amr" else {}
    config = TrainConfig(epochs=args.train_epochs, patience=5)
    base = train_baseline(zoo, dataset, model_kwargs=kwargs, data_kwargs=data_kwargs, config=config)
    ds, model = base.dataset, base.model.eval()
    x1 = ds.example(1)
    gm = fxslim.trace(model)
    base_acc = evaluate(model, ds)["accuracy"]
    rows = [
        {
            "model": label,
            "variant": "baseline",
            "params": fxslim.count(gm, (x1,)).params,
            "macs": fxslim.count(gm, (x1,)).macs,
            "acc_before_ft": base_acc,
            "accuracy": base_acc,
            "search_s": 0.0,
            "module": model,
        }
    ]
    records = {}
    for variant in tqdm(VARIANTS, desc=label, leave=False):
        t0 = time.perf_counter()
        if variant == "tltorch":
            new = tltorch_at(model, records["tucker"])
            if new is None:
                continue
            record = {"search_seconds": 0.0, "layers": records["tucker"]["layers"]}
        else:
            new, record = factorise(gm, ds.example(4), ds.train, variant, args)
        records[variant] = record
        seconds = time.perf_counter() - t0
        before = evaluate(new, ds)["accuracy"]
        tuned = copy.deepcopy(new).train()
        fit(
            tuned,
            lambda epoch: (ds.train, ds.val),
            epochs=args.ft_epochs,
            lr=1e-3,
            teacher=model,
            kd_temperature=4.0,
            seed=0,
            desc=f"finetune {variant}",
        )
        tuned.eval()
        rows.append(
            {
                "model": label,
                "variant": variant,
                "params": sum(p.numel() for p in tuned.parameters()),
                "macs": macs_of(tuned, x1, variant),
                "acc_before_ft": before,
                "accuracy": evaluate(tuned, ds)["accuracy"],
                "search_s": record["search_seconds"],
                "pass_s": seconds,
                "methods": {r["target"]: r.get("method", "tucker") for r in record["layers"]},
                "layers": len(record["layers"]),
                "module": tuned,
            }
        )
    latencies = measure_latency(rows, x1, args.latency_budget)
    for r in rows:
        r["latency_ms"] = latencies.get(r["variant"], float("nan")) * 1e3
        r["macs_ratio"] = r["macs"] / rows[0]["macs"]
        r["acc_drop_pt"] = 100 * (rows[0]["accuracy"] - r["accuracy"])
    rows[0]["layer_order"] = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (torch.nn.Conv1d, torch.nn.Conv2d))
    ]
    rows[0]["hybrid_layers"] = records.get("hybrid", {}).get("layers", [])
    return rows


def measure_latency(rows: list[dict], x: torch.Tensor, budget: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-lrf-") as tmp:
        paths = {}
        for r in rows:
            path = Path(tmp) / f"{r['variant']}.onnx"
            try:
                fxslim.export_onnx(r["module"].eval(), (x,), path)
                paths[r["variant"]] = path
            except fxslim.ExportError as exc:
                print(f"{r['model']} {r['variant']}: ONNX export failed: {exc}", file=sys.stderr)
        return ort_latency(paths, x.numpy(), budget_s=budget)


def table(rows: list[dict]) -> str:
    head = (
        "| model | variant | params | MACs | MACs vs base | acc before FT | acc after FT | drop (pt) "
        "| ORT latency (ms) | rank search (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['macs']:,} | {r['macs_ratio']:.2f} "
            f"| {r['acc_before_ft']:.2%} | {r['accuracy']:.2%} | {r['acc_drop_pt']:+.1f} | {r['latency_ms']:.3f} "
            f"| {r['search_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_methods(per_model: list[list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(per_model), figsize=(4.2 * len(per_model), 4.6), squeeze=False)
    for ax, rows in zip(axes[0], per_model, strict=True):
        base = rows[0]
        chosen = {r["target"]: r for r in base["hybrid_layers"]}
        names = base["layer_order"]
        for i, name in enumerate(names):
            rec = chosen.get(name)
            kept = 1.0 if rec is None else rec["macs_after"] / rec["macs_before"]
            ax.barh(i, kept, color=METHOD_COLORS["kept" if rec is None else rec["method"]])
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("layer MACs after / before")
        ax.set_title(f"{base['model']}: hybrid choice per conv", fontsize=9)
    handles = [Patch(color=c, label=m) for m, c in METHOD_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(per_model: list[list[dict]]) -> list[str]:
    """The issue's three targets, checked on the measured rows."""
    out = []
    beats = 0
    for rows in per_model:
        by = {r["variant"]: r for r in rows}
        h = by.get("hybrid")
        singles = [by[m] for m in ("tucker", "cp", "tt") if m in by]
        if h and all(h["macs"] <= s["macs"] and h["accuracy"] >= s["accuracy"] - 0.005 for s in singles):
            beats += 1
    out.append(
        f"hybrid has the fewest MACs of all single methods at accuracy within 0.5 pt (or better): "
        f"{beats} of {len(per_model)} models (target: >= 2)"
    )
    for rows in per_model:
        if rows[0]["model"].startswith("ResNet-20 ("):
            best = [r for r in rows[1:] if r["macs_ratio"] <= 0.5 and r["acc_drop_pt"] <= 1.0]
            reached = ", ".join(f"{r['variant']} ({1 - r['macs_ratio']:.0%}, {r['acc_drop_pt']:+.1f} pt)" for r in best)
            out.append("ResNet-20 >= 50% MAC reduction at <= 1 pt drop: " + (reached or "not reached by any variant"))
            searched = ("tucker", "cp", "tt", "hybrid")
            searches = {r["variant"]: r["search_s"] for r in rows[1:] if r["variant"] in searched}
            out.append(
                "ResNet-20 rank search seconds (target < 60): " + ", ".join(f"{k} {v:.1f}" for k, v in searches.items())
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--similarity", type=float, default=0.92)
    p.add_argument("--uniform-rank", type=float, default=0.5)
    p.add_argument("--calib", type=int, default=1000, help="calibration samples for the rank search")
    p.add_argument("--cp-iterations", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--train-epochs", type=int, default=30)
    p.add_argument("--amr-frames", type=int, default=40, help="AMR frames per (class, SNR)")
    p.add_argument("--models", default=",".join(m[1] for m in MODELS))
    p.add_argument("--latency-budget", type=float, default=3.0)
    p.add_argument("--json", default=None)
    p.add_argument("--write-md", default=None)
    p.add_argument("--plot", default="docs/lrf_methods.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.calib, args.ft_epochs, args.amr_frames, args.latency_budget = 256, 2, 20, 1.0
        args.cp_iterations = 15
        args.train_epochs = 15
    t0 = time.perf_counter()
    per_model = [run_model(label, zoo, ds, kw, args) for label, zoo, ds, kw in MODELS if zoo in args.models.split(",")]
    rows = [r for rows in per_model for r in rows]
    text = table(rows)
    checks = targets(per_model)
    print(text)
    print("\n".join(checks))
    figures = [{k: v for k, v in r.items() if k not in ("module", "hybrid_layers", "layer_order")} for r in rows]
    if args.json:
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "bench": "lrf",
                        "quick": args.quick,
                        "similarity": args.similarity,
                        "rows": figures,
                        "targets": checks,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                + "\n"
            )
    if args.plot:
        plot_methods(per_model, Path(args.plot))
    if args.write_md:
        cmd = "python tools/bench_lrf.py " + " ".join(argv if argv is not None else sys.argv[1:])
        md = Path(args.write_md)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(
            f"# Low-rank factorisation results\n\nCommand: `{cmd}` ({time.perf_counter() - t0:.0f} s, "
            f"2-core CPU, one torch thread). Similarity threshold {args.similarity}, "
            f"{args.calib} calibration samples, {args.ft_epochs} fine-tune epochs (KD T=4), "
            f"AMR {args.amr_frames} frames per (class, SNR). MACs and latency at batch 1.\n\n"
            f"{text}\n\n## Targets\n\n"
            + "\n".join(f"- {c}" for c in checks)
            + f"\n\n![hybrid per-layer choice](../{Path(args.plot).name})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
