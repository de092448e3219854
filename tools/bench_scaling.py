"""Analysis + pruning time against graph size: is fxslim's cost about linear in the number of nodes?

    python tools/bench_scaling.py [--quick] [--json out.jsonl] [--plot docs/results/scaling.png]

For ResNet-18/50/101/152 and DenseNet-121/169/201 (random init, 1×3×64×64, one torch thread) it times
`fxslim.trace`, `fxslim.analyze` and `prune_channels` at ratio 0.5 (median of --repeats runs, wall
clock), prints a table with seconds per 1000 nodes, writes one JSON line per model and a log-log plot of
time vs node count. --quick: ResNet-18/50 and DenseNet-121 with one repeat."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench_io import pyplot, save_figure  # noqa: E402

import fxslim  # noqa: E402
from fxslim.pass_api import PassContext  # noqa: E402
from fxslim.passes import prune_channels  # noqa: E402

MODELS = ["resnet18", "resnet50", "resnet101", "resnet152", "densenet121", "densenet169", "densenet201"]
QUICK = ["resnet18", "resnet50", "densenet121"]


def measure(name: str, repeats: int) -> dict:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    trace_s, analyze_s, prune_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gm = fxslim.trace(model)
        t1 = time.perf_counter()
        dg = fxslim.analyze(gm, (x,))
        t2 = time.perf_counter()
        prune_channels.run(gm, PassContext(example_inputs=(x,)), ratio=0.5)  # analyses again, then rewrites
        t3 = time.perf_counter()
        trace_s.append(t1 - t0)
        analyze_s.append(t2 - t1)
        prune_s.append(t3 - t2)
    nodes = len(gm.graph.nodes)
    return {"model": name, "nodes": nodes, "groups": len(dg.groups), "trace_s": statistics.median(trace_s),
            "analyze_s": statistics.median(analyze_s), "prune_s": statistics.median(prune_s)}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    n = [r["nodes"] for r in rows]
    for key, label in (("analyze_s", "analyze"), ("prune_s", "prune_channels (analysis + rewrite + check)")):
        ax.loglog(n, [r[key] for r in rows], "o", label=label)
    lo, hi = min(n), max(n)
    ref = rows[0]["prune_s"] / rows[0]["nodes"]
    ax.loglog([lo, hi], [ref * lo, ref * hi], "k--", lw=0.8, label="linear in nodes")
    for r in rows:
        ax.annotate(r["model"], (r["nodes"], r["prune_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("graph nodes")
    ax.set_ylabel("seconds (one thread)")
    ax.set_title("fxslim analysis and pruning time vs graph size")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names, repeats = (QUICK, 1) if args.quick else (MODELS, args.repeats)
    rows = [measure(n, repeats) for n in names]
    print(f"{'model':<12}{'nodes':>7}{'groups':>8}{'trace s':>9}{'analyze s':>11}{'prune s':>9}"
          f"{'prune s/1k nodes':>18}")
    for r in rows:
        print(f"{r['model']:<12}{r['nodes']:>7}{r['groups']:>8}{r['trace_s']:>9.2f}{r['analyze_s']:>11.2f}"
              f"{r['prune_s']:>9.2f}{1000 * r['prune_s'] / r['nodes']:>18.2f}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
