"""End-to-end training-step benchmark (a GPU benchmark; ``--device cpu`` only smoke-tests it).

Full optimizer steps of the pipeline's own model at the sizes users pick this tool for: a BERT-base-sized
encoder (random init, no download), documents of 128 tokens, a classifier over Amazon-670K's and
Amazon-3M's label counts, dense or fixed fan-in K in {32, 64, 128} or RPS at the bytes of fixed fan-in
K = 64 (compression 8). One step is ``--accumulate`` micro-batches of ``--micro-batch`` synthetic documents
(5 labels each) forward and backward under bf16 autocast, then the optimizers (fused AdamW, as training
uses). SET rewiring is not part of a step (it runs every few hundred steps; see bench_fixed_fanin.py).

Per row: peak memory allocated and reserved over the whole run (model built, warm-up and timed steps, over
what was allocated before), the median step time and examples per second, and beside them what
``xmc memory`` estimates for the same shape, with the ratio measured / estimated. Rows go to
``benchmarks/results/train_step.jsonl`` with device, versions, git revision and date.

    python benchmarks/bench_train_step.py [--labels 670091 2812281] [--classifiers dense fixed_fanin rps]
        [--fan-in 32 64 128] [--micro-batch 32] [--accumulate 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import statistics
import time
from pathlib import Path

import torch
from common import append_row, git_revision

from xmc.memory.measure import build_step
from xmc.memory.planner import ENCODERS, Plan, encoder_spec, estimate
from xmc.runtime import device_name, peak_memory, reset_peak_memory

RESULTS = Path(__file__).parent / "results" / "train_step.jsonl"


def run_one(
    plan: Plan, backend: str, device: torch.device, warmup: int, steps: int, loss: str, state: str
) -> dict:
    """Build, warm up and time one configuration; peak memory over the allocation before it was built."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        reset_peak_memory(device)
        base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    model, step = build_step(plan, backend, device, loss, state)
    built = time.perf_counter() - started
    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses.append(step())  # returns a float: the step has finished on the device
        times.append(time.perf_counter() - start)
    row = {
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_all": [1e3 * t for t in times],
        "examples_per_second": plan.batch * plan.grad_accum / statistics.median(times),
        "build_seconds": built,
        "loss_first_last": [losses[0], losses[-1]],
        "estimate_bytes": sum(estimate(plan, (backend,))[backend].values()),
    }
    if cuda:
        peak = peak_memory(device)
        row["peak_allocated_bytes"] = peak["allocated"] - base
        row["peak_reserved_bytes"] = peak["reserved"]
        row["peak_allocated_gib"] = row["peak_allocated_bytes"] / 2**30
        row["estimate_ratio"] = row["peak_allocated_bytes"] / row["estimate_bytes"]
    del model, step
    gc.collect()
    return row


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--labels", nargs="+", type=int, default=[670_091, 2_812_281])
    parser.add_argument("--classifiers", nargs="+", default=["dense", "fixed_fanin", "rps"])
    parser.add_argument("--fan-in", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument(
        "--rps-compression", type=float, default=8.0, help="8: the bytes of fixed fan-in K=64"
    )
    parser.add_argument(
        "--encoder",
        default="bert-base",
        choices=[*sorted(ENCODERS), "features"],
        help="features: precomputed 768-wide inputs, so a step is the classifier's alone",
    )
    parser.add_argument(
        "--classifier-state",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="train.classifier_state: bf16 keeps the classifier's weights and moments in bf16",
    )
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--loss", default="squared_hinge", choices=["bce", "squared_hinge"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench_train_step.py measures GPU training steps: no CUDA device (--device cpu smoke-tests)"
        )
    device = torch.device(args.device)
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git_revision(),
        "date": dt.date.today().isoformat(),
        "encoder": args.encoder,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "accumulate": args.accumulate,
        "loss": args.loss,
        "precision": "bf16",
    }
    table = []
    spec = encoder_spec(args.encoder, hidden=768)
    runs = [
        (labels, backend, fan_in, state)
        for labels in args.labels
        for backend in args.classifiers
        for fan_in in (args.fan_in if backend == "fixed_fanin" else [64])
        for state in args.classifier_state
        if not (state == "bf16" and backend == "rps")  # bf16 state serves dense and fixed fan-in
    ]
    for labels, backend, fan_in, state in runs:
        plan = Plan(
            labels=labels,
            encoder=spec,
            fan_in=fan_in,
            batch=args.micro_batch,
            seq_len=args.seq_len,
            precision="bf16",
            grad_accum=args.accumulate,
            device=device.type,
            rps_compression=args.rps_compression,
            classifier_state=state,
        )
        row = {**meta, "labels": labels, "classifier": backend, "classifier_state": state}
        if backend == "fixed_fanin":
            row["fan_in"] = fan_in
        if backend == "rps":
            row["rps_compression"] = args.rps_compression
        try:
            row.update(run_one(plan, backend, device, args.warmup, args.steps, args.loss, state))
        except torch.OutOfMemoryError as err:  # the dense baseline may not fit: say so, go on
            row["error"] = f"out of memory: {err}"
            gc.collect()
            torch.cuda.empty_cache()
        append_row(args.results, row)
        table.append(row)
    print(f"\n{'labels':>10} {'classifier':<22}{'step ms':>9}{'ex/s':>8}{'peak GiB':>10}{'estimate GiB':>14}")
    for r in table:
        name = r["classifier"] + (f" K={r['fan_in']}" if "fan_in" in r else "") + f" {r['classifier_state']}"
        if "error" in r:
            print(f"{r['labels']:>10} {name:<22} {r['error'][:60]}")
            continue
        peak = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else "-"
        print(
            f"{r['labels']:>10} {name:<22}{r['step_ms']:>9.1f}{r['examples_per_second']:>8.0f}{peak:>10}"
            f"{r['estimate_bytes'] / 2**30:>14.2f}"
        )


if __name__ == "__main__":
    main()
