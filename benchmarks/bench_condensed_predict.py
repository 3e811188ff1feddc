"""Top-10 prediction on the CPU: condensed fixed fan-in versus dense (a CPU benchmark).

For each label count L (52,946, CiteULike-t's, and a synthetic 1,000,000) at D = 768 and K = 64, builds
random weights once (dense (L, D) float32; condensed (L, K) float32 values + int16 ids) and times top-10
prediction of precomputed representations at batch 1 and batch 256:

- condensed: :class:`xmc.inference.condensed.SparseRows` (SciPy CSR times the (D, B) batch, label chunk
  by label chunk, merged into a running top-k), what ``xmc export`` folders predict with;
- dense: ``torch.mm`` over the same label chunks (MKL, all threads) into the same running top-k.

Both run side by side in one process, repeats interleaved (dense, condensed, dense, ...) so machine noise
falls on both; each row gives the median seconds per batch, documents per second and the ratio. Rows are
appended to ``benchmarks/results/condensed_predict.jsonl``.

    python benchmarks/bench_condensed_predict.py [--labels 52946 1000000] [--batches 1 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import torch
from common import append_row, git_revision

from xmc.inference.condensed import SCORE_ELEMENTS, SparseRows
from xmc.inference.topk import TopKAccumulator

RESULTS = Path(__file__).parent / "results" / "condensed_predict.jsonl"


def dense_topk(x: np.ndarray, weight: torch.Tensor, bias: torch.Tensor, k: int):
    """Top ``k`` of ``x @ weight.T + bias`` over label chunks of the condensed path's size."""
    batch, rows = x.shape[0], weight.shape[0]
    h = torch.from_numpy(x)
    best = TopKAccumulator(batch, k)
    step = max(1, min(rows, SCORE_ELEMENTS // batch))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = torch.addmm(bias[start:stop], h, weight[start:stop].t())
        best.update(scores.numpy(), slice(0, batch), start)
    return best.result()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--labels", nargs="+", type=int, default=[52_946, 1_000_000])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--fan-in", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    revision = git_revision()
    rng = np.random.default_rng(0)
    for labels in args.labels:
        # Distinct ids per row: a random offset plus a random stride coprime to D walks D columns.
        start = rng.integers(0, args.dim, (labels, 1))
        stride = rng.choice(np.arange(1, args.dim, 2), (labels, 1))  # odd strides: coprime to 768
        ids = ((start + stride * np.arange(args.fan_in)) % args.dim).astype(np.int16)
        values = (rng.standard_normal((labels, args.fan_in), dtype=np.float32) / np.sqrt(args.fan_in)).astype(
            np.float32
        )
        bias = rng.standard_normal(labels, dtype=np.float32) * 0.1
        condensed = SparseRows(values, ids, bias, args.dim)
        dense = torch.zeros(labels, args.dim)
        dense.scatter_(1, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(values))
        dense_bias = torch.from_numpy(bias)
        for batch in args.batches:
            x = rng.standard_normal((batch, args.dim), dtype=np.float32)
            # Same answer first: the benchmark compares two ways of computing one thing.
            got, want = condensed.topk(x, args.k), dense_topk(x, dense, dense_bias, args.k)
            if not np.array_equal(got[1], want[1]):
                raise SystemExit(f"L={labels} B={batch}: condensed and dense top-{args.k} ids differ")
            times: dict[str, list[float]] = {"dense": [], "condensed": []}
            for _ in range(args.repeats):
                began = time.perf_counter()
                dense_topk(x, dense, dense_bias, args.k)
                times["dense"].append(time.perf_counter() - began)
                began = time.perf_counter()
                condensed.topk(x, args.k)
                times["condensed"].append(time.perf_counter() - began)
            median = {name: statistics.median(t) for name, t in times.items()}
            append_row(
                RESULTS,
                {
                    "labels": labels,
                    "dim": args.dim,
                    "fan_in": args.fan_in,
                    "batch": batch,
                    "k": args.k,
                    "dense_s": round(median["dense"], 5),
                    "condensed_s": round(median["condensed"], 5),
                    "dense_docs_per_s": round(batch / median["dense"], 1),
                    "condensed_docs_per_s": round(batch / median["condensed"], 1),
                    "speedup": round(median["dense"] / median["condensed"], 2),
                    "dense_model_mb": round(dense.numel() * 4 / 2**20, 1),
                    "condensed_model_mb": round(condensed.nbytes / 2**20, 1),
                    "repeats": args.repeats,
                    "device": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                    "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__,
                    "scipy": scipy.__version__,
                    "python": platform.python_version(),
                    "git": revision,
                },
            )
        del dense, condensed


if __name__ == "__main__":
    main()
