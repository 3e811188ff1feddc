"""CPU accuracy of classifier options over several seeds, each option beside its baseline in one batch.

Runs ``xmc train --config CONFIG`` once per (variant, seed), ``--jobs`` runs at a time, each in its own
process with one BLAS thread, and appends one JSON row per run (test P@1/3/5, nDCG@5, PSP@5, dev P@1 of the
kept epoch, time, the exact command) to ``--results``; then prints each variant's mean and its difference
from the first variant's mean. A variant is a name and its overrides (``name:key=value,key=value``; the
name alone for none).

    python benchmarks/bench_seeds.py --config configs/citeulike-t-tfidf.yaml --data \\
        data.train=../shared/data/citeulike-t/train.txt data.test=../shared/data/citeulike-t/test.txt \\
        --variants plain grouped-G16:classifier.fan_in_group=16 --seeds 0 1 2 --jobs 3 \\
        --results benchmarks/results/grouped_fanin_accuracy.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import append_row, git_revision


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", nargs="*", default=[], help="overrides every run takes (data paths)")
    parser.add_argument(
        "--variants", nargs="+", required=True, help="name[:key=value,...]; the first is the baseline"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time (one BLAS thread each)")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variants)
    meta = {
        "bench": "seeds",
        "config": Path(args.config).stem,
        "git": git_revision(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "device": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.jobs} runs at once, 1 thread",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = [(name, overrides, seed) for seed in args.seeds for name, overrides in variants.items()]
    scores: dict[str, list[float]] = {name: [] for name in variants}
    states: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory() as scratch:
        running: list[tuple[subprocess.Popen, str, int, list[str], float, Path]] = []
        while queue or running:
            while queue and len(running) < args.jobs:
                name, overrides, seed = queue.pop(0)
                run_dir = Path(scratch) / f"{name}-{seed}"
                command = ["xmc", "train", "--config", args.config, "--no-progress"]
                command += [*args.data, *overrides, f"seed={seed}"]
                log = open(Path(scratch) / f"{name}-{seed}.log", "w")  # noqa: SIM115 (closed with the run)
                process = subprocess.Popen(
                    [*command[:2], "--run-dir", str(run_dir), *command[2:]], stdout=log, stderr=log, env=env
                )
                running.append((process, name, seed, command, time.perf_counter(), run_dir))
            time.sleep(2)
            for item in [r for r in running if r[0].poll() is not None]:
                running.remove(item)
                process, name, seed, command, started, run_dir = item
                if process.returncode != 0:
                    tail = (Path(scratch) / f"{name}-{seed}.log").read_text()[-2000:]
                    raise SystemExit(f"{name} seed {seed} failed ({process.returncode}):\n{tail}")
                metrics = json.loads((run_dir / "metrics.json").read_text())
                test = {
                    k: v
                    for k, v in metrics["test"].items()
                    if k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "RP@5")
                }
                row = {**meta, "variant": name, "overrides": variants[name], "seed": seed}
                row.update(test=test, dev_P1=metrics.get("dev", {}).get("P@1"))
                row.update(classifier_bytes=metrics["classifier_bytes"], epochs=metrics["epochs"])
                # weights, ids, gradients and optimizer state of the classifier side (XMCModel)
                row.update(classifier_state_bytes=metrics.get("classifier_state_bytes"))
                row.update(train_seconds=round(metrics["train_seconds"], 1))
                row.update(seconds=round(time.perf_counter() - started, 1), command=shlex.join(command))
                append_row(args.results, row)
                scores[name].append(100 * test["P@1"])
                states[name] = metrics.get("classifier_state_bytes")
    base = sum(scores[next(iter(variants))]) / len(args.seeds)
    for name, values in scores.items():
        mean = sum(values) / len(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        state = f", state {states[name] / 2**20:.1f} MiB" if states.get(name) else ""
        print(f"{name:<24} test P@1 mean {mean:.2f} ({runs}) {mean - base:+.2f}{state}")


if __name__ == "__main__":
    main()
