"""SET (random) versus RigL (gradient) regrowth of the fixed fan-in classifier (a CPU benchmark).

Trains the bag-of-words encoder at D = 256 into a fixed fan-in classifier on the repository's bibtex and
citeulike-t splits with each shipped config (``configs/<dataset>.yaml``: its epochs, learning rates and
rewiring interval), changing only ``encoder.dim``, ``classifier.fan_in`` and ``classifier.set.regrow``.
Appends one row per run (test P@1 / P@5, training seconds, rewirings, device, versions, git revision) to
``benchmarks/results/regrowth.jsonl``.

    python benchmarks/bench_regrowth.py [--data ../shared/data] [--datasets bibtex citeulike-t] \
        [--fan-in 16 32] [--regrow random gradient]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import append_row, git_revision

from xmc.config import default_config_path, load_config
from xmc.train.run import run_training

RESULTS = Path(__file__).parent / "results" / "regrowth.jsonl"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["bibtex", "citeulike-t"])
    parser.add_argument("--fan-in", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--regrow", nargs="+", default=["random", "gradient"])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    revision = git_revision()
    for dataset in args.datasets:
        folder = Path(args.data) / dataset
        for fan_in in args.fan_in:
            for regrow in args.regrow:
                overrides = [
                    f"data.train={folder / 'train.txt'}",
                    f"data.test={folder / 'test.txt'}",
                    f"encoder.dim={args.dim}",
                    "classifier.type=fixed_fanin",
                    f"classifier.fan_in={fan_in}",
                    f"classifier.set.regrow={regrow}",
                    f"seed={args.seed}",
                ]
                config = load_config(default_config_path().parent / f"{dataset}.yaml", overrides)
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as run_dir:
                    metrics = run_training(config, run_dir, progress=False)
                append_row(
                    RESULTS,
                    {
                        "dataset": dataset,
                        "dim": args.dim,
                        "fan_in": fan_in,
                        "regrow": regrow,
                        "seed": args.seed,
                        "epochs": config.train.epochs,
                        "interval": config.classifier.set.interval,
                        "P@1": round(100 * metrics["test"]["P@1"], 2),
                        "P@5": round(100 * metrics["test"]["P@5"], 2),
                        "optimizer_steps": metrics["optimizer_steps"],
                        "seconds": round(time.perf_counter() - started, 1),
                        "device": f"CPU ({os.cpu_count()} cores)",
                        "date": time.strftime("%Y-%m-%d"),
                        "torch": torch.__version__,
                        "python": platform.python_version(),
                        "git": revision,
                    },
                )


if __name__ == "__main__":
    main()
