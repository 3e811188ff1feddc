"""Accuracy versus memory: RPS methods and fixed fan-in at equal budgets, and dense, with the bow encoder.

For each dataset (shipped ``configs/<dataset>.yaml``, repository split in ``--data``) and each fan-in K
of ``--fan-ins``, the budget is what a fixed fan-in classifier with that K keeps: parameters (weights,
bias), ids and AdamW state, in bytes. Each RPS method gets a shared array sized so that its array,
bias and their AdamW state take the same bytes: ``m = (budget - 12 L) / 12`` slots. Dense runs once.
Appends one JSON row per run to ``benchmarks/results/rps_budget.jsonl`` and draws
``benchmarks/results/rps_budget.png`` (P@1 against bytes, log scale) from every row of that file
measured at the current settings.

    python benchmarks/bench_rps_budget.py [--data ../shared/data] [--datasets bibtex citeulike-t]
        [--fan-ins 8 16 32] [--epochs N] [--methods hashednet roast stable]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import append_row, git_revision

from xmc.config import default_config_path, load_config
from xmc.memory.planner import counts_from_data
from xmc.train.run import run_training

RESULTS = Path(__file__).parent / "results" / "rps_budget.jsonl"
CHART = Path(__file__).parent / "results" / "rps_budget.png"
BUDGET_PARTS = ("weights", "indices", "optimizer")  # parameters + ids + optimizer state


def budget_bytes(kind: str, dim: int, labels: int, **options) -> int:
    from xmc.memory.planner import backends

    parts = backends()[kind].state_bytes(dim, labels, **options)
    return sum(parts.get(p, 0) for p in BUDGET_PARTS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["bibtex", "citeulike-t"])
    parser.add_argument("--fan-ins", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument(
        "--methods", nargs="+", default=["hashednet", "roast", "stable", "fixed_fanin", "dense"]
    )
    parser.add_argument("--epochs", type=int, help="override train.epochs (e.g. to fit a CPU time budget)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the chart from the results file")
    args = parser.parse_args()
    if not args.plot_only:
        revision = git_revision()
        for dataset in args.datasets:
            run_dataset(args, dataset, revision)
    plot()


def run_dataset(args, dataset: str, revision: str) -> None:
    folder = Path(args.data) / dataset
    base = [f"data.train={folder / 'train.txt'}", f"data.test={folder / 'test.txt'}"]
    if args.epochs:
        base.append(f"train.epochs={args.epochs}")
    config_path = default_config_path().parent / f"{dataset}.yaml"
    config = load_config(config_path, base)
    labels, _ = counts_from_data(config)
    dim = config.classifier.intermediate or config.encoder.dim
    runs = []
    for k in args.fan_ins:
        budget = budget_bytes("fixed_fanin", dim, labels, fan_in=k)
        slots = (budget - 12 * labels) // 12
        for method in args.methods:
            if method == "dense":
                continue
            if method == "fixed_fanin":
                runs.append((method, k, budget, ["classifier.type=fixed_fanin", f"classifier.fan_in={k}"]))
            else:
                runs.append(
                    (
                        method,
                        k,
                        budget,
                        [
                            "classifier.type=rps",
                            f"classifier.rps.method={method}",
                            f"classifier.rps.bytes={4 * slots}",
                        ],
                    )
                )
    if "dense" in args.methods:
        runs.append(("dense", None, budget_bytes("dense", dim, labels), ["classifier.type=dense"]))
    for method, k, budget, overrides in runs:
        config = load_config(config_path, base + overrides)
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = run_training(config, run_dir, progress=False)
        test = metrics["test"]
        append_row(
            RESULTS,
            {
                "bench": "rps_budget",
                "date": time.strftime("%Y-%m-%d"),
                "git": revision,
                "dataset": dataset,
                "method": method,
                "budget_of_fan_in": k,
                "budget_bytes": budget,
                "dim": dim,
                "labels": labels,
                "epochs_max": config.train.epochs,
                "epochs": metrics["epochs"],
                **{f"P@{j}": round(100 * test[f"P@{j}"], 2) for j in (1, 3, 5)},
                "train_seconds": round(metrics["train_seconds"], 1),
                "device": metrics["device"],
            },
        )


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    latest = {}
    for row in rows:  # the newest row of each (dataset, method, budget)
        latest[(row["dataset"], row["method"], row["budget_bytes"])] = row
    datasets = list(dict.fromkeys(key[0] for key in latest))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4), squeeze=False)
    styles = {"hashednet": "s-", "roast": "^-", "stable": "o-", "fixed_fanin": "D-", "dense": "k*"}
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method, style in styles.items():
            points = sorted(
                (r["budget_bytes"], r["P@1"])
                for (d, m, _), r in latest.items()
                if d == dataset and m == method
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=method, markersize=9 if method == "dense" else 5)
        ax.set_xscale("log")
        ax.set_xlabel("classifier bytes: parameters + ids + AdamW state")
        ax.set_ylabel("test P@1 (%)")
        epochs = sorted({r["epochs_max"] for (d, _, _), r in latest.items() if d == dataset})
        ax.set_title(f"{dataset} (training runs of up to {'/'.join(map(str, epochs))} epochs)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    print(f"chart written to {CHART}")


if __name__ == "__main__":
    main()
