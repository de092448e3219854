"""Real speed after structured pruning: onnxruntime time ratio against MAC ratio, per objective.

    python tools/bench_latency.py --quick --plot      # the chart goes to runs/latency/
    python tools/bench_latency.py --json runs/latency/latency.jsonl --profile \
        --write-md --plot docs/latency_speed_per_mac.png    # the docs' page (docs/results/latency.md) and figure

For ResNet-18/50, MobileNetV3-Large, EfficientNet-B0, ConvNeXt-Tiny and ViT-B/16 (torchvision, random init,
eval, batch 1; inputs --size, 64x64 by default, ViT-B/16 at --vit-size with image_size the same, 32x32 by
default; `--size 224 --vit-size 224` times them at ImageNet size) it prunes at ratio 0.5 with
`prune_channels` four ways (objective "macs", "macs" + round_to=8, "latency" with round_to=1, "latency" +
round_to=8, its default; the classifier ignored, as for the peer) and with the Torch-Pruning package
(MagnitudePruner, L1, ratio 0.5, classifier ignored) where it is installed and works. Every variant and the
original are exported to ONNX and timed together with `fxslim.export.ort_latency` (median process CPU
seconds per run, one ORT thread, interleaved). Per variant: MAC ratio (fxslim's counter, after / before),
ORT time ratio, and speed per MAC = MAC ratio / time ratio (1.0: time falls exactly as MACs do; below 1:
MACs fall faster than time). --profile adds an onnxruntime per-op profile (share of kernel time per op kind,
depthwise convs apart) of the original and of each fxslim variant. The first objective="latency" run on a
model measures its layers and the memory-bound ops between them (cached in ~/.cache/fxslim/latency.json);
later runs read the cache. This tool only measures."""

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
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench_io import md_link, pyplot, run_path, save_figure  # noqa: E402

import fxslim  # noqa: E402
from fxslim.export import ort_latency  # noqa: E402

RATIO = 0.5
MODELS = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
QUICK = ["resnet18", "mobilenet_v3_large", "efficientnet_b0"]
VIT = "vit_b_16"  # input --vit-size (32), also its image_size: a multiple of 16; the others: --size (64)
VARIANTS = {
    "macs": {"objective": "macs"},
    "macs+r8": {"objective": "macs", "round_to": 8},
    "latency": {"objective": "latency", "round_to": 1},  # objective="latency" rounds to 8 unless told not to
    "latency+r8": {"objective": "latency", "round_to": 8},
}
PEER = "torch-pruning"


def build(name: str, size: int, vit_size: int = 32) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """The model (random init; all-zero classifier weights re-drawn so outputs are not constant), its input,
    and its classifier modules (the layers whose output width is the number of classes)."""
    torch.manual_seed(0)
    kwargs = {"image_size": vit_size} if name == VIT else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and not bool(m.weight.any()):
                nn.init.normal_(m.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    s = vit_size if name == VIT else size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        classes = model(x).shape[-1]
    heads = [q for q, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    return model, x, heads


def prune_fxslim(model: nn.Module, x: torch.Tensor, options: dict) -> dict:
    c0 = time.process_time()
    # no ignore: fxslim never shrinks the model output, and ignoring the classifier would also freeze its
    # input columns (Torch-Pruning's ignored_layers keeps only the output)
    res = fxslim.compress(model, (x,), [{"pass": "prune_channels", "ratio": RATIO, **options}])
    rec = res.report[0].details
    out = {
        "module": res.module,
        "cpu_s": time.process_time() - c0,
        "macs_before": res.report[0].macs_before,
        "macs_after": res.report[-1].macs_after,
        "params_ratio": res.report[-1].params_after / res.report[0].params_before,
    }
    lat = rec.get("latency")
    if lat:
        out["latency"] = {
            k: lat[k]
            for k in (
                "target_s",
                "estimated_s",
                "estimated_full_s",
                "table_full_s",
                "measured",
                "lookups",
                "layers",
                "steps",
            )
        }
    out["kept"] = [(g["size"], g["kept"]) for g in rec.get("per_group", [])]
    return out


def prune_peer(model: nn.Module, x: torch.Tensor, heads: list[str]) -> dict:
    """Torch-Pruning's documented usage: MagnitudePruner (L1) at the same ratio, classifier ignored."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = [model.get_submodule(h) for h in heads]
    c0 = time.process_time()
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO, ignored_layers=ignored
    )
    pruner.step()
    cpu = time.process_time() - c0
    with torch.no_grad():
        model(x)
    return {"module": model, "cpu_s": cpu, "macs_after": fxslim.count(model, (x,)).macs}


def bench_model(
    name: str, size: int, budget_s: float, profile: bool, peer: bool, repeats: int = 1, vit_size: int = 32
) -> dict:
    model, x, heads = build(name, size, vit_size)
    macs_before = fxslim.count(model, (x,)).macs
    rec: dict = {"model": name, "input": list(x.shape), "macs": macs_before, "variants": {}}
    modules: dict[str, nn.Module] = {"original": model}
    for vname, options in VARIANTS.items():
        try:
            out = prune_fxslim(model, x, options)
        except Exception as exc:  # one failing variant is reported, the others still run
            rec["variants"][vname] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        modules[vname] = out.pop("module")
        rec["variants"][vname] = {**out, "macs_ratio": out["macs_after"] / macs_before}
    if peer:
        try:
            out = prune_peer(model, x, heads)
            modules[PEER] = out.pop("module")
            rec["variants"][PEER] = {**out, "macs_ratio": out["macs_after"] / macs_before}
        except Exception as exc:
            rec["variants"][PEER] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        paths = {}
        for vname, module in modules.items():
            path = Path(tmp) / f"{vname}.onnx"
            try:
                fxslim.export_onnx(module, (x,), path)
                paths[vname] = path
            except Exception as exc:
                target = rec["variants"].get(vname, rec)
                target["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if "original" not in paths:
            return rec
        # several interleaved calls, median ratio: on a shared machine one call's ratios swung by ~10-20%
        runs = [ort_latency(paths, x.numpy(), budget_s=budget_s) for _ in range(repeats)]
        rec["ort_ms"] = float(np.median([t["original"] for t in runs])) * 1e3
        for vname in paths:
            if vname == "original":
                continue
            v = rec["variants"][vname]
            ratios = [t[vname] / t["original"] for t in runs]
            v["ort_ms"] = float(np.median([t[vname] for t in runs])) * 1e3
            v["time_ratio"] = float(np.median(ratios))
            v["time_ratio_range"] = [min(ratios), max(ratios)]
            v["speed_per_mac"] = v["macs_ratio"] / v["time_ratio"]
        if profile:
            rec["profile"] = {v: op_profile(p, x.numpy()) for v, p in paths.items() if v != PEER}
    return rec


def op_profile(path: Path, x: np.ndarray, runs: int = 30) -> dict[str, float]:
    """onnxruntime's own per-node kernel times (one thread), summed per op kind and averaged per run, in
    ms; a Conv whose weight has one input channel per group is counted as "Conv (depthwise)"."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-latency-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(5):
            sess.run(None, feed)
        sess.end_profiling()
        opts.profile_file_prefix = str(Path(tmp) / "prof2")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 2):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        op = args.get("op_name", "?")
        if op in ("Conv", "FusedConv") and _is_depthwise(args):
            op = "Conv (depthwise)"
        elif op == "FusedConv":
            op = "Conv"
        per[op] += ev.get("dur", 0) / 1e3 / (runs + 2)
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def _is_depthwise(args: dict) -> bool:
    shapes = args.get("input_type_shape", [])
    try:
        w = next(iter(shapes[1].values()))
        return len(w) == 4 and w[1] == 1 and w[0] > 1
    except (IndexError, StopIteration, AttributeError, TypeError):
        return False


# ---- output ------------------------------------------------------------------------------------------


def table(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        for vname in [*VARIANTS, PEER]:
            v = r["variants"].get(vname)
            if v is None:
                continue
            if "error" in v or "time_ratio" not in v:
                rows.append([r["model"], vname, "fail: " + v.get("error", v.get("export_error", "?")), "", "", "", ""])
                continue
            extra = ""
            if "latency" in v:
                lat = v["latency"]
                extra = f"est {lat['estimated_s'] / lat['estimated_full_s']:.2f}, {lat['measured']} new"
            lo, hi = v["time_ratio_range"]
            spread = f" ({lo:.2f}-{hi:.2f})" if hi > lo else ""
            rows.append(
                [
                    r["model"],
                    vname,
                    f"{v['macs_ratio']:.3f}",
                    f"{v['time_ratio']:.3f}{spread}",
                    f"{v['speed_per_mac']:.2f}",
                    f"{v['cpu_s']:.1f}",
                    extra,
                ]
            )
    return rows


HEADER = [
    "model",
    "variant",
    "MAC ratio",
    "ORT time ratio",
    "speed per MAC",
    "prune CPU s",
    "latency est. ratio, new measurements",
]


def text_table(records: list[dict]) -> str:
    rows = [HEADER, *table(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def summary(records: list[dict]) -> dict:
    out = {}
    for vname in [*VARIANTS, PEER]:
        spm = {r["model"]: r["variants"].get(vname, {}).get("speed_per_mac") for r in records}
        got = [s for s in spm.values() if s is not None]
        out[vname] = {
            "speed_per_mac": spm,
            "min": min(got) if got else None,
            "all_ge_0.9": bool(got) and len(got) == len(records) and min(got) >= 0.9,
        }
    return out


def plot(records: list[dict], path: Path) -> None:
    plt = pyplot()

    names = [r["model"] for r in records]
    variants = [v for v in [*VARIANTS, PEER] if any(v in r["variants"] for r in records)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(variants)
    for i, vname in enumerate(variants):
        vals = [r["variants"].get(vname, {}).get("speed_per_mac", np.nan) for r in records]
        ax.bar(np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width, vals, width, label=vname)
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("speed per MAC (MAC ratio / ORT time ratio)")
    ax.set_title(f"Pruning {RATIO:.0%} of channels: does time fall as MACs do? (dashed: 0.9)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    save_figure(fig, path)


def write_markdown(path: Path, records: list[dict], s: dict, argv: list[str], wall: float, plot_path) -> None:
    lines = [
        "# Real speed after 50% channel pruning: ORT time vs MACs",
        "",
        f"Command: `python tools/bench_latency.py {' '.join(argv)}` ({datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, one torch and one ORT thread, wall {wall / 60:.1f} min; the machine was shared "
        "with other jobs, which process CPU time tolerates). Random init, batch 1, inputs as listed.",
        "",
        "*MAC ratio* = fxslim's MAC count after / before; *ORT time ratio* = median process CPU time per run "
        "after / before (`fxslim.export.ort_latency`, all variants of a model interleaved in one call; the median "
        "over the calls, their range in brackets); "
        "*speed per MAC* = MAC ratio / time ratio (1: time falls as MACs do). *prune CPU s* = process CPU "
        "seconds of `fxslim.compress` (for objective latency it includes measuring new layers); *est. ratio* = "
        "the pass's estimated latency of the measured layers and memory-bound ops after / before, *new* = layers "
        "and ops timed in this run (0: all read from the cache). Torch-Pruning: MagnitudePruner L1, ratio 0.5, "
        "classifier ignored.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table(records)]
    lines += [
        "",
        "Inputs: "
        + ", ".join(
            f"{r['model']} {'x'.join(map(str, r['input'][2:]))}, {r.get('ort_ms', float('nan')):.2f} ms"
            for r in records
        ),
        "",
    ]
    lines += ["Speed per MAC >= 0.9 on every model:"]
    lines += [
        f"- {v}: {'yes' if x['all_ge_0.9'] else 'no'} (min {x['min']:.2f})"
        if x["min"] is not None
        else f"- {v}: not run"
        for v, x in s.items()
    ]
    if plot_path:
        lines += ["", f"![speed per MAC]({md_link(plot_path, path)})"]
    prof = [r for r in records if r.get("profile")]
    if prof:
        lines += ["", "## Where the time goes (onnxruntime per-op profile, ms per run, one thread)", ""]
        for r in prof:
            kinds = list(r["profile"])
            ops = sorted(
                {op for p in r["profile"].values() for op in p}, key=lambda op: -r["profile"]["original"].get(op, 0)
            )
            lines += [f"**{r['model']}**", "", "| op | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            total = {k: sum(r["profile"][k].values()) for k in kinds}
            for op in ops[:8]:
                cells = [
                    f"{r['profile'][k].get(op, 0):.3f} ({r['profile'][k].get(op, 0) / total[k]:.0%})" for k in kinds
                ]
                lines.append(f"| {op} | " + " | ".join(cells) + " |")
            lines += ["| total kernel time | " + " | ".join(f"{total[k]:.3f}" for k in kinds) + " |", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, shorter timing")
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--size", type=int, default=64, help="input size of the CNNs (default 64)")
    p.add_argument("--vit-size", type=int, default=32, help="ViT-B/16 input and image_size, a multiple of 16 (32)")
    p.add_argument("--budget", type=float, default=None, help="ORT timing seconds per call (6; --quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing calls per model (3; --quick 1)")
    p.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--profile", action="store_true", help="add an onnxruntime per-op profile per model")
    p.add_argument("--json", type=Path, help="append one JSON line per model and a summary line")
    p.add_argument(
        "--write-md",
        nargs="?",
        const=REPO / "docs/results/latency.md",
        type=Path,
        help="write the markdown page here (bare: %(const)s)",
    )
    p.add_argument(
        "--plot",
        nargs="?",
        const=run_path("latency", "latency_speed_per_mac.png"),
        type=Path,
        help="write the speed-per-MAC chart here (bare: %(const)s); docs/latency_speed_per_mac.png is the docs' one",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    peer = not args.no_peer
    if peer:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("Torch-Pruning is not installed (make bench-install); running without it", file=sys.stderr)
            peer = False
    names = args.models.split(",") if args.models else QUICK if args.quick else MODELS
    budget = args.budget if args.budget is not None else (4.0 if args.quick else 6.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    records, t0 = [], time.perf_counter()
    for name in (bar := tqdm(names, unit="model", dynamic_ncols=True)):
        bar.set_postfix_str(name)
        rec = bench_model(name, args.size, budget, args.profile, peer, repeats, args.vit_size)
        records.append(rec)
        tqdm.write(
            f"{name}: "
            + ", ".join(f"{v} {x.get('speed_per_mac', float('nan')):.2f}" for v, x in rec["variants"].items())
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a") as fh:
                fh.write(json.dumps({**rec, "kind": "model"}) + "\n")
    wall = time.perf_counter() - t0
    s = summary(records)
    print()
    print(text_table(records))
    print()
    for v, x in s.items():
        if x["min"] is not None:
            print(f"{v}: speed per MAC min {x['min']:.2f}, >= 0.9 on all: {x['all_ge_0.9']}")
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"kind": "summary", "wall_s": wall, "argv": argv, "repeats": repeats, **s}) + "\n")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    if args.write_md:
        write_markdown(args.write_md, records, s, argv, wall, args.plot)
        print(f"wrote {args.write_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
