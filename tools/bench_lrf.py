"""Low-rank factorisation benchmark: accuracy against MACs for each LRF method and the hybrid.

    python tools/bench_lrf.py [--quick] [--grid 0.6,0.7,0.8,0.9] [--seeds 2] [--json runs/lrf/lrf.jsonl]
                              [--write-md docs/results/lrf.md --plot docs/lrf_methods.png --curves docs/lrf_curves.png]

Models (baselines trained once and cached by fxslim.zoo.train.train_baseline): ResNet-20 and VGG-BN on
scikit-learn digits (8×8 images, 1 channel; the zoo's seeded 80/20 split, 360 test images), or with
`--image-task rotated_digits` on the same split upsampled to `--image-size` and each image rotated by its
own random angle (a harder task), and ResNet-20-1D on synthetic AMR (`--amr-frames` frames per (class, SNR)
from `--amr-snr-min` to 18 dB; 20 % of them are the test set). Those three are the default of `--models`;
`resnet56` (the 56-layer CIFAR ResNet) and `densenet_small` (a small DenseNet-BC) run on the image task too
when named.

Per model and per similarity threshold of `--grid`, each of `lowrank_conv`'s methods ("tucker", "cp", "tt"),
the hybrid as in the paper ("hybrid": method="auto", objective="flops") and the hybrid that holds CP chains to
`--cp-scale` of the allowed dissimilarity ("hybrid_ft": dissimilarity_scale={"cp": 0.5}, because CP chains
recover least in fine-tuning) and the hybrid over Tucker-2 and TT only ("hybrid_nocp": candidates=["tucker",
"tt"], the LRF paper's exclusion of a method; `--hybrids` picks which hybrids run) factorises the baseline;
every factorised model's BatchNorm statistics are re-estimated on `--bn-batches` training batches
(bn_recalibrate; 0 skips it) or, with `--reconstruct N`, the last layer of every chain re-fit by least squares
to the original layer's output on N training batches (lowrank_conv reconstruct=True, as in the lrf recipes; no
BN recalibration then), then it gets the same one-shot fine-tune (fxslim.training.fit, `--ft-epochs`, Adam
1e-3, distillation from the baseline at T=4) once per seed of `--seeds`; a seed reshuffles the training
samples every epoch (the zoo's batch lists are fixed, so without it two seeds would train identically) and the
accuracy of a point is the mean over seeds. That gives one accuracy-vs-MACs curve per method, the baseline as
its full-MACs end.

The comparison "at equal accuracy": for an accuracy level L (baseline − 1 pt, and the levels of `--levels`)
each method's MACs are read off its Pareto front (the grid points no cheaper point beats in accuracy, plus
the baseline), linearly interpolated in MACs between the last front point under L and the first at or
above it. When the method's cheapest point already reaches L the grid does not bound it from below and
the value is reported as "≤". The hybrid wins at L against a method when its MACs are lower by more than
1 % (closer is a tie) and that is not an artefact of such a bound.

At `--ref-similarity` (one grid value) the detail table adds uniform-rank Tucker-2 (`--uniform-rank`, no
search), tensorly-torch's Tucker `FactorizedConv` at the ranks our Tucker search chose (when tensorly-torch
is installed; MACs by torch.utils.flop_counter, FLOPs/2), and ORT latency at batch 1 (fxslim.export.ort_latency:
process CPU time, one thread, the variants of a model interleaved). Prints the tables and the targets,
appends one JSON line, writes a markdown page, a chart of the hybrid's per-layer choices (`--plot`) and the
accuracy-vs-MACs curves (`--curves`); the charts go to runs/lrf/ unless those flags name other paths (docs/
only so). `--report-from a.jsonl,b.jsonl` writes the report of earlier runs (e.g. the digits models and AMR
run side by side). --quick: thresholds 0.8 and 0.9, one seed, one fine-tune epoch, fewer AMR frames and
calibration samples."""

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

from bench_io import md_link, pyplot, run_path, save_figure  # noqa: E402

import fxslim  # noqa: E402
from fxslim.export import ort_latency  # noqa: E402
from fxslim.pass_api import PassContext  # noqa: E402
from fxslim.passes import bn_recalibrate, lowrank_conv  # noqa: E402
from fxslim.training import fit  # noqa: E402
from fxslim.zoo.amr import SNRS as AMR_SNRS  # noqa: E402
from fxslim.zoo.train import TrainConfig, evaluate, train_baseline  # noqa: E402

MODELS = [  # name, zoo model, dataset ("image": the task of --image-task), model kwargs
    ("ResNet-20", "resnet20", "image", {"in_ch": 1}),
    ("VGG-BN", "vgg_bn", "image", {"in_ch": 1}),
    ("ResNet-20-1D", "resnet20_1d", "amr", {}),
    ("ResNet-56", "resnet56", "image", {"in_ch": 1}),
    ("DenseNet-S", "densenet_small", "image", {"in_ch": 1}),
]
DEFAULT_MODELS = ("resnet20", "vgg_bn", "resnet20_1d")  # the three; the others on request
IMAGE_TASKS = ("digits", "rotated_digits")
TIE_MARGIN = 0.01  # MACs at a level within this share of the larger count as a tie
SINGLE = ("tucker", "cp", "tt")
HYBRIDS = ("hybrid", "hybrid_ft", "hybrid_nocp")
CURVES = (*SINGLE, *HYBRIDS)
METHOD_COLORS = {"tucker": "tab:blue", "cp": "tab:orange", "tt": "tab:green", "kept": "lightgray"}
CURVE_STYLE = {"tucker": "tab:blue", "cp": "tab:orange", "tt": "tab:green", "hybrid": "black", "hybrid_ft": "tab:red",
               "hybrid_nocp": "tab:purple"}


# ---------------------------------------------------------------------------------------------------------
# Building and fine-tuning one point.


def factorise(gm, x, data, variant: str, similarity: float, args) -> tuple[torch.nn.Module, dict]:
    ctx = PassContext(example_inputs=(x,), data=data)
    refit = {"reconstruct": True, "calib_batches": args.reconstruct} if args.reconstruct else {}
    if variant == "uniform":
        res = lowrank_conv.run(gm, ctx, method="tucker", rank=args.uniform_rank, **refit)
    else:
        opts = {"similarity": similarity, "calib_samples": args.calib, "cp_iterations": args.cp_iterations, **refit}
        if variant in HYBRIDS:
            scale = {"cp": args.cp_scale} if variant == "hybrid_ft" else None
            candidates = ["tucker", "tt"] if variant == "hybrid_nocp" else None
            res = lowrank_conv.run(
                gm, ctx, method="auto", objective="flops", dissimilarity_scale=scale, candidates=candidates, **opts
            )
        else:
            res = lowrank_conv.run(gm, ctx, method=variant, **opts)
    return (res.module if refit else recalibrated(res.module, ctx, args)), res.record


def recalibrated(module: torch.nn.Module, ctx: PassContext, args) -> torch.nn.Module:
    """`module` with its BatchNorm statistics re-estimated on `args.bn_batches` training batches (the
    recipes' bn_recalibrate between factorising and fine-tuning); unchanged with --bn-batches 0. Our chains
    skip it under --reconstruct (the re-fit gives every BN the statistics it was trained on); the tltorch
    peer, which has no re-fit, always gets it."""
    if not args.bn_batches:
        return module
    return bn_recalibrate.run(module, ctx, calib_batches=args.bn_batches).module


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


def reshuffled(batches: list, seed: int, epoch: int) -> list:
    """The training samples of `batches` in an order drawn from (seed, epoch), cut into batches of the same size."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 * seed + epoch))
    size = len(batches[0][1])
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def finetune(new: torch.nn.Module, teacher: torch.nn.Module, ds, seed: int, epochs: int) -> torch.nn.Module:
    tuned = copy.deepcopy(new).train()
    fit(
        tuned,
        lambda epoch: (reshuffled(ds.train, seed, epoch), ds.val),
        epochs=epochs,
        lr=1e-3,
        teacher=teacher,
        kd_temperature=4.0,
        seed=seed,
        desc=f"finetune seed {seed}",
    )
    return tuned.eval()


def measure_point(label, variant, similarity, new, record, model, ds, x1, args) -> dict:
    before = evaluate(new, ds)["accuracy"]
    tuned = [finetune(new, model, ds, seed, args.ft_epochs) for seed in range(args.seeds)]
    accs = [evaluate(t, ds)["accuracy"] for t in tuned]
    return {
        "model": label,
        "variant": variant,
        "similarity": similarity,
        "params": sum(p.numel() for p in tuned[0].parameters()),
        "macs": macs_of(tuned[0], x1, variant),
        "acc_before_ft": before,
        "accuracy": sum(accs) / len(accs),
        "accuracy_seeds": accs,
        "search_s": record["search_seconds"],
        "reconstruct_s": record.get("reconstruct_seconds", 0.0),
        "methods": {r["target"]: r.get("method", "tucker") for r in record["layers"]},
        "layers": len(record["layers"]),
        "module": tuned[0],
    }


def chosen_models(args) -> list[tuple[str, str, str, dict, dict]]:
    """(label, zoo model, dataset, model kwargs, data kwargs) of each model of --models, on the tasks of the
    arguments: the image models on --image-task, ResNet-20-1D on AMR."""
    out = []
    for name, zoo, dataset, kwargs in MODELS:
        if zoo not in args.models:
            continue
        if dataset == "amr":
            data_kwargs = {"n_per_class_snr": args.amr_frames}
            if args.amr_snr_min > AMR_SNRS.start:  # the default grid keeps the cached baseline's key
                data_kwargs["snrs"] = list(range(args.amr_snr_min, AMR_SNRS.stop, AMR_SNRS.step))
            out.append((f"{name} (AMR)", zoo, dataset, kwargs, data_kwargs))
        elif args.image_task == "digits":
            out.append((f"{name} (digits)", zoo, "digits", kwargs, {}))
        else:
            task = {"size": args.image_size, "angles": "any"}
            out.append((f"{name} (rotated digits {args.image_size}²)", zoo, "rotated_digits", kwargs, task))
    return out


def run_model(label: str, zoo: str, dataset: str, kwargs: dict, data_kwargs: dict, args) -> dict:
    config = TrainConfig(epochs=args.train_epochs, patience=5)
    base = train_baseline(zoo, dataset, model_kwargs=kwargs, data_kwargs=data_kwargs, config=config)
    ds, model = base.dataset, base.model.eval()
    x1 = ds.example(1)
    gm = fxslim.trace(model)
    base_acc = evaluate(model, ds)["accuracy"]
    cost = fxslim.count(gm, (x1,))
    baseline = {
        "model": label,
        "variant": "baseline",
        "similarity": 1.0,
        "params": cost.params,
        "macs": cost.macs,
        "acc_before_ft": base_acc,
        "accuracy": base_acc,
        "accuracy_seeds": [base_acc],
        "search_s": 0.0,
        "module": model,
    }
    points, records = [], {}
    jobs = [(v, s) for s in args.grid for v in (*SINGLE, *args.hybrids)]
    for variant, sim in tqdm(jobs, desc=label, leave=False):
        new, record = factorise(gm, ds.example(4), ds.train, variant, sim, args)
        records[variant, sim] = record
        points.append(measure_point(label, variant, sim, new, record, model, ds, x1, args))
    extra = []
    new, record = factorise(gm, ds.example(4), ds.train, "uniform", args.ref_similarity, args)
    extra.append(measure_point(label, "uniform", None, new, record, model, ds, x1, args))
    peer = tltorch_at(model, records["tucker", args.ref_similarity])
    if peer is not None:
        peer = recalibrated(peer, PassContext(example_inputs=(ds.example(4),), data=ds.train), args)
        record = {"search_seconds": 0.0, "layers": records["tucker", args.ref_similarity]["layers"]}
        extra.append(measure_point(label, "tltorch", args.ref_similarity, peer, record, model, ds, x1, args))
    detail = [baseline] + [p for p in points if p["similarity"] == args.ref_similarity] + extra
    latencies = measure_latency(detail, x1, args.latency_budget)
    for r in [baseline, *points, *extra]:
        in_detail = any(r is d for d in detail)
        r["latency_ms"] = latencies.get(r["variant"], float("nan")) * 1e3 if in_detail else float("nan")
        r["macs_ratio"] = r["macs"] / baseline["macs"]
        r["acc_drop_pt"] = 100 * (base_acc - r["accuracy"])
    layer_order = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (torch.nn.Conv1d, torch.nn.Conv2d))
    ]
    return {
        "model": label,
        "baseline": baseline,
        "points": points,
        "detail": detail,
        "layer_order": layer_order,
        "hybrid_layers": {v: records[v, args.ref_similarity]["layers"] for v in args.hybrids},
    }


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


# ---------------------------------------------------------------------------------------------------------
# Reading MACs at equal accuracy off the curves.


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (MACs, accuracy) points that no cheaper (or equally cheap) point matches in accuracy, by MACs."""
    front: list[tuple[int, float]] = []
    for macs, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((macs, acc))
    return front


def macs_at(points: list[tuple[int, float]], level: float) -> tuple[float | None, bool]:
    """(MACs at which the Pareto front first reaches accuracy `level`, bounded): linear in MACs between the
    last front point under the level and the first at or above it. bounded=False when the cheapest front
    point already reaches the level (the true value is at most the one returned); (None, True) when no
    point reaches it."""
    front = pareto_front(points)
    for i, (macs, acc) in enumerate(front):
        if acc >= level:
            if i == 0:
                return float(macs), False
            m0, a0 = front[i - 1]
            return m0 + (level - a0) / (acc - a0) * (macs - m0), True
    return None, True


def compare(hybrid: tuple[float | None, bool], other: tuple[float | None, bool], tie: float = 0.0) -> str:
    """'wins' / 'loses' / 'ties' / 'open' for the hybrid's MACs at a level against another method's. MACs
    within a share `tie` of the larger tie: a hybrid that differs from a method in one small layer does not win."""
    (h, h_bounded), (o, o_bounded) = hybrid, other
    if h is None:
        return "loses" if o is not None else "open"
    if o is None:
        return "wins"
    if abs(h - o) <= tie * max(h, o):
        return "ties" if h_bounded and o_bounded else "open"
    if h < o:
        return "wins" if o_bounded else "open"  # the other's true value may lie anywhere below its bound
    return "loses" if h_bounded else "open"


def measured(result: dict) -> list[str]:
    """The curves of CURVES that `result` has points of (a report of an older run may lack a hybrid)."""
    return [v for v in CURVES if any(p["variant"] == v for p in result["points"])]


def curve(result: dict, variant: str) -> list[tuple[int, float]]:
    base = result["baseline"]
    return [(base["macs"], base["accuracy"])] + [
        (p["macs"], p["accuracy"]) for p in result["points"] if p["variant"] == variant
    ]


def equal_accuracy(result: dict, drops: list[float]) -> list[dict]:
    """Per accuracy level (baseline minus each drop in points), each curve's MACs and the hybrid's verdicts."""
    base = result["baseline"]
    rows = []
    for drop in drops:
        level = base["accuracy"] - drop / 100
        at = {v: macs_at(curve(result, v), level) for v in measured(result)}
        verdicts = {h: {v: compare(at[h], at[v], TIE_MARGIN) for v in SINGLE} for h in HYBRIDS if h in at}
        rows.append({"model": result["model"], "drop_pt": drop, "level": level, "macs": at, "verdicts": verdicts})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tables, charts, targets.


def _macs_cell(value: tuple[float | None, bool], base_macs: int) -> str:
    macs, bounded = value
    if macs is None:
        return "not reached"
    return f"{'' if bounded else '≤ '}{macs / 1e6:.3f} M ({macs / base_macs:.2f})"


def equal_accuracy_table(rows: list[dict], base_macs: dict[str, int]) -> str:
    curves = [v for v in CURVES if any(v in r["macs"] for r in rows)]
    hybrids = [h for h in HYBRIDS if h in curves]
    lines = [
        "| model | level (drop) | " + " | ".join(curves) + " | "
        + " | ".join(f"{h} vs tucker / cp / tt" for h in hybrids) + " |",
        "|---|---|" + "---:|" * len(curves) + "---|" * len(hybrids),
    ]
    for r in rows:
        cells = " | ".join(
            _macs_cell(r["macs"][v], base_macs[r["model"]]) if v in r["macs"] else "–" for v in curves
        )
        verdicts = " | ".join(
            " / ".join(r["verdicts"][h][v] for v in SINGLE) if h in r["verdicts"] else "–" for h in hybrids
        )
        offset = f"{'−' if r['drop_pt'] >= 0 else '+'}{abs(r['drop_pt']):g} pt"  # a negative drop: above the baseline
        lines.append(f"| {r['model']} | {r['level']:.2%} ({offset}) | {cells} | {verdicts} |")
    return "\n".join(lines)


def grid_table(results: list[dict]) -> str:
    lines = [
        "| model | similarity | method | MACs vs base | params | acc before FT | acc after FT (mean) | per seed "
        "| rank search (s) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for res in results:
        for p in sorted(res["points"], key=lambda p: (CURVES.index(p["variant"]), p["similarity"])):
            seeds = ", ".join(f"{a:.2%}" for a in p["accuracy_seeds"])
            lines.append(
                f"| {p['model']} | {p['similarity']:g} | {p['variant']} | {p['macs_ratio']:.3f} | {p['params']:,} "
                f"| {p['acc_before_ft']:.2%} | {p['accuracy']:.2%} | {seeds} | {p['search_s']:.1f} |"
            )
    return "\n".join(lines)


def detail_table(results: list[dict]) -> str:
    head = (
        "| model | variant | params | MACs | MACs vs base | acc before FT | acc after FT | drop (pt) "
        "| ORT latency (ms) | rank search (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for res in results:
        for r in res["detail"]:
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['macs']:,} | {r['macs_ratio']:.2f} "
                f"| {r['acc_before_ft']:.2%} | {r['accuracy']:.2%} | {r['acc_drop_pt']:+.1f} | {r['latency_ms']:.3f} "
                f"| {r['search_s']:.1f} |"
            )
    return "\n".join(lines)


def plot_methods(results: list[dict], path: Path) -> None:
    from matplotlib.patches import Patch

    plt = pyplot()

    hybrids = [h for h in HYBRIDS if any(h in res["hybrid_layers"] for res in results)]
    size = (4.2 * len(results), 4.5 * len(hybrids))
    fig, axes = plt.subplots(len(hybrids), len(results), figsize=size, squeeze=False)
    for row, hybrid in enumerate(hybrids):
        for ax, res in zip(axes[row], results, strict=True):
            chosen = {r["target"]: r for r in res["hybrid_layers"].get(hybrid, [])}
            names = res["layer_order"]
            for i, name in enumerate(names):
                rec = chosen.get(name)
                kept = 1.0 if rec is None else rec["macs_after"] / rec["macs_before"]
                ax.barh(i, kept, color=METHOD_COLORS["kept" if rec is None else rec["method"]])
            ax.set_yticks(range(len(names)), names, fontsize=6)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("layer MACs after / before")
            ax.set_title(f"{res['model']}: {hybrid} per conv", fontsize=9)
    handles = [Patch(color=c, label=m) for m, c in METHOD_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    save_figure(fig, path, dpi=110, rect=(0, 0.03, 1, 1))


def plot_curves(results: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(4.4 * len(results), 4.0), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        base = res["baseline"]
        for v in measured(res):
            pts = sorted(curve(res, v))
            ax.plot(
                [m / base["macs"] for m, _ in pts],
                [100 * a for _, a in pts],
                marker="o",
                ms=3,
                color=CURVE_STYLE[v],
                label=v,
                lw=1.8 if v == "hybrid" else 1.0,
            )
        ax.axhline(100 * base["accuracy"] - 1, color="gray", ls="--", lw=0.8, label="baseline − 1 pt")
        ax.set_xlabel("MACs / baseline")
        ax.set_ylabel("test accuracy after fine-tune (%)")
        ax.set_title(res["model"], fontsize=9)
        accs = [100 * p["accuracy"] for p in res["points"]]
        ax.set_ylim(max(min(accs) - 1, 100 * base["accuracy"] - 15), max(accs + [100 * base["accuracy"]]) + 0.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def targets(results: list[dict], equal_rows: list[dict]) -> list[str]:
    """The issue's three targets, checked on the measured points."""
    main = [r for r in equal_rows if r["drop_pt"] == 1.0]
    out = []
    for hybrid in HYBRIDS:
        rows = [r for r in main if hybrid in r["verdicts"]]  # the models this hybrid was run on
        if not rows:
            continue
        # distinct models: a report of several runs (--report-from a,b) may hold one model twice
        won = sorted({r["model"] for r in rows if all(v == "wins" for v in r["verdicts"][hybrid].values())})
        out.append(
            f"{hybrid} needs fewer MACs than tucker, cp and tt at equal accuracy (baseline − 1 pt, on each "
            f"method's interpolated curve): {len(won)} of {len({r['model'] for r in rows})} models"
            f"{' (' + ', '.join(won) + ')' if won else ''} (target: >= 2)"
        )
    for res in results:
        if not res["model"].startswith("ResNet-20 ("):
            continue
        rows = res["points"] + [r for r in res["detail"] if r["variant"] in ("uniform", "tltorch")]
        best = [r for r in rows if r["macs_ratio"] <= 0.5 and r["acc_drop_pt"] <= 1.0]
        reached = ", ".join(
            f"{r['variant']}@{r['similarity']} ({1 - r['macs_ratio']:.0%}, {r['acc_drop_pt']:+.1f} pt)" for r in best
        )
        out.append("ResNet-20 >= 50% MAC reduction at <= 1 pt drop: " + (reached or "not reached by any point"))
        searches: dict[str, list[float]] = {}
        for p in res["points"]:
            searches.setdefault(p["variant"], []).append(p["search_s"])
        out.append(
            "ResNet-20 rank search seconds (target < 60), max over the grid: "
            + ", ".join(f"{k} {max(v):.1f}" for k, v in searches.items())
        )
    return out


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--grid", default="0.6,0.7,0.8,0.9", help="similarity thresholds, comma-separated")
    p.add_argument("--ref-similarity", type=float, default=0.8, help="grid value of the detail table")
    p.add_argument(
        "--levels",
        default="1,0.5,2",
        help="accuracy drops (pt) to compare MACs at; 1 is the target; a negative drop is a level above the baseline",
    )
    p.add_argument("--seeds", type=int, default=2, help="fine-tune seeds averaged per point")
    p.add_argument("--uniform-rank", type=float, default=0.5)
    p.add_argument("--calib", type=int, default=256, help="calibration samples for the rank search")
    p.add_argument("--cp-iterations", type=int, default=15)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--bn-batches", type=int, default=16, help="BN recalibration batches before fine-tuning (0: none)")
    p.add_argument(
        "--reconstruct",
        type=int,
        default=0,
        help="re-fit each chain's last layer by least squares on this many training batches instead of "
        "recalibrating BN (lowrank_conv reconstruct=True; 0: off)",
    )
    p.add_argument("--train-epochs", type=int, default=20)
    p.add_argument("--amr-frames", type=int, default=30, help="AMR frames per (class, SNR)")
    p.add_argument(
        "--amr-snr-min",
        type=int,
        default=AMR_SNRS.start,
        help=f"lowest AMR SNR in dB (grid {AMR_SNRS.start}..{AMR_SNRS[-1]} step {AMR_SNRS.step}): "
        "frames far below 0 dB are near chance for every model and make accuracy differences noise",
    )
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, of: {', '.join(m[1] for m in MODELS)} (the deeper ResNet-56 and the small DenseNet-BC "
        "run on the image task too)",
    )
    p.add_argument(
        "--image-task",
        choices=IMAGE_TASKS,
        default="digits",
        help="task of the image models: the 8×8 digits, or the digits upsampled to --image-size and each "
        "rotated by its own random angle (a harder task)",
    )
    p.add_argument("--image-size", type=int, default=16, help="image side for --image-task rotated_digits")
    p.add_argument(
        "--hybrids", default=",".join(HYBRIDS), help=f"hybrids to run besides the single methods: {', '.join(HYBRIDS)}"
    )
    p.add_argument("--latency-budget", type=float, default=1.0)
    p.add_argument("--json", default=None)
    p.add_argument("--write-md", default=None)
    p.add_argument("--plot", help="the hybrid's per-layer choices chart (default runs/lrf/lrf[_quick]_methods.png)")
    p.add_argument("--curves", help="the accuracy-vs-MACs chart (default runs/lrf/lrf[_quick]_curves.png)")
    p.add_argument("--cp-scale", type=float, default=0.5, help="hybrid_ft: CP's share of the allowed dissimilarity")
    p.add_argument("--report-from", default=None, help="JSON files (comma-separated) of earlier runs: report only")
    args = p.parse_args(argv)
    if args.amr_snr_min > AMR_SNRS[-1]:
        p.error(f"--amr-snr-min {args.amr_snr_min} leaves no SNR (the grid ends at {AMR_SNRS[-1]} dB)")
    if args.quick:
        args.grid, args.ref_similarity, args.seeds = "0.8,0.9", 0.9, 1
        args.calib, args.ft_epochs, args.amr_frames, args.latency_budget = 256, 1, 20, 0.5
        args.train_epochs = 15
    run = "lrf_quick" if args.quick else "lrf"  # a quick run keeps the full run's charts
    args.plot = str(run_path("lrf", f"{run}_methods.png")) if args.plot is None else args.plot
    args.curves = str(run_path("lrf", f"{run}_curves.png")) if args.curves is None else args.curves
    args.models = tuple(m for m in args.models.split(",") if m)
    if unknown := set(args.models) - {m[1] for m in MODELS}:
        p.error(f"--models: unknown {', '.join(sorted(unknown))} (valid: {', '.join(m[1] for m in MODELS)})")
    args.hybrids = tuple(h for h in args.hybrids.split(",") if h)
    if unknown := set(args.hybrids) - set(HYBRIDS):
        p.error(f"--hybrids: unknown {', '.join(sorted(unknown))} (valid: {', '.join(HYBRIDS)})")
    if "hybrid" not in args.hybrids:
        p.error("--hybrids must include 'hybrid' (the paper's; its choices are the chart)")
    args.grid = [float(s) for s in args.grid.split(",")]
    args.levels = [float(s) for s in args.levels.split(",")]
    if 1.0 not in args.levels:
        args.levels.insert(0, 1.0)
    if args.ref_similarity not in args.grid:
        p.error(f"--ref-similarity {args.ref_similarity} is not in --grid {args.grid}")
    return args


def run_settings(run: dict) -> str:
    """One run's command, wall time and the settings it ran with (its argv parsed again)."""
    a = parse_args(run["argv"])
    models = ", ".join(m[0] for m in chosen_models(a))
    return (
        f"`python tools/bench_lrf.py {' '.join(run['argv'])}`: {models}; {run['seconds'] / 60:.1f} min. Similarity "
        f"grid {', '.join(f'{s:g}' for s in a.grid)} (detail table at {a.ref_similarity:g}); {a.calib} calibration "
        f"samples; CP {a.cp_iterations} ALS sweeps; {a.ft_epochs} fine-tune epochs (KD T=4), accuracy the mean of "
        f"{a.seeds} fine-tune seed(s); hybrid_ft holds CP to {a.cp_scale:g} of the allowed dissimilarity; "
        + (
            f"each chain's last layer re-fit by least squares on {a.reconstruct} training batches (reconstruct)"
            if a.reconstruct
            else f"BatchNorm recalibrated on {a.bn_batches} training batches"
        )
        + (
            f"; images: the digits upsampled to {a.image_size}×{a.image_size}, each rotated by a random angle"
            if a.image_task == "rotated_digits"
            else ""
        )
        + (
            f"; AMR {a.amr_frames} frames per (class, SNR), SNR {a.amr_snr_min}.."
            f"{AMR_SNRS[-1]} dB, baseline {a.train_epochs} epochs"
            if "AMR" in models
            else ""
        )
        + "."
    )


def markdown(args, runs: list[dict], sections: dict[str, str], checks: list[str]) -> str:
    commands = "\n".join(f"- {run_settings(r)}" for r in runs)
    return (
        "# Low-rank factorisation results\n\n"
        f"{commands}\n\n2-core CPU shared with other jobs, one torch thread; MACs at batch 1.\n\n"
        f"## MACs at equal accuracy\n\n{sections['equal']}\n\n## Targets\n\n"
        + "\n".join(f"- {c}" for c in checks)
        + f"\n\n![accuracy vs MACs]({md_link(args.curves, args.write_md)})\n\n## All points\n\n{sections['grid']}\n\n"
        "## At the reference similarity, with uniform rank, tensorly-torch and latency\n\n"
        f"{sections['detail']}\n\n![hybrid per-layer choice]({md_link(args.plot, args.write_md)})\n"
    )


def without_modules(result: dict) -> dict:
    """A model's results as JSON-able data (the fine-tuned modules dropped)."""
    strip = lambda r: {k: v for k, v in r.items() if k != "module"}  # noqa: E731
    return {
        **result,
        "baseline": strip(result["baseline"]),
        "points": [strip(r) for r in result["points"]],
        "detail": [strip(r) for r in result["detail"]],
    }


def load_runs(paths: list[str]) -> list[dict]:
    """The last JSON line of each file: one run each (e.g. the digits models and AMR run side by side)."""
    runs = []
    for path in paths:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        runs.append(json.loads(lines[-1]))
    return runs


def report(args, runs: list[dict]) -> None:
    results = [res for run in runs for res in run["results"]]
    equal_rows = [row for res in results for row in equal_accuracy(res, args.levels)]
    base_macs = {res["model"]: res["baseline"]["macs"] for res in results}
    sections = {
        "equal": equal_accuracy_table(equal_rows, base_macs),
        "grid": grid_table(results),
        "detail": detail_table(results),
    }
    checks = targets(results, equal_rows)
    print(sections["detail"], sections["grid"], sections["equal"], "\n".join(checks), sep="\n\n")
    if args.plot:
        plot_methods(results, Path(args.plot))
    if args.curves:
        plot_curves(results, Path(args.curves))
    if args.write_md:
        md = Path(args.write_md)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(args, runs, sections, checks))


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.report_from:
        report(args, load_runs(args.report_from.split(",")))
        return 0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [without_modules(run_model(*model, args)) for model in chosen_models(args)]
    run = {"bench": "lrf", "argv": argv, "quick": args.quick, "results": results}
    run["seconds"] = time.perf_counter() - t0
    report(args, [run])
    equal_rows = [row for res in results for row in equal_accuracy(res, args.levels)]
    run["equal_accuracy"] = equal_rows
    run["targets"] = targets(results, equal_rows)
    print(f"{run['seconds']:.0f} s")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(run, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
