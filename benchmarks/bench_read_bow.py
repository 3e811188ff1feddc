"""CPU benchmark: read and write a ~100 MB bag-of-words file.

Writes a synthetic file of realistic shape (Amazon-670K-like: 135,909 features, 670,091 labels,
tf-idf-like float values), then times ``write_bow`` and ``read_bow`` and the peak resident memory of
reading. Appends one JSON row to ``benchmarks/results/read_bow.jsonl``.

    python benchmarks/bench_read_bow.py [--rows 250000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from common import append_row, git_revision

from xmc import __version__
from xmc.data import read_bow, write_bow
from xmc.runtime import resident_bytes

RESULTS = Path(__file__).parent / "results" / "read_bow.jsonl"


def make_data(rows: int, seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    per_row = rng.integers(20, 60, rows)
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    cols = rng.integers(0, 135_909, indptr[-1])
    X = sp.csr_matrix((rng.random(indptr[-1]).astype(np.float32), cols, indptr), shape=(rows, 135_909))
    X.sum_duplicates()
    labels_per_row = rng.integers(1, 10, rows)
    lptr = np.concatenate([[0], np.cumsum(labels_per_row)])
    Y = sp.csr_matrix(
        (np.ones(lptr[-1], np.float32), rng.integers(0, 670_091, lptr[-1]), lptr), shape=(rows, 670_091)
    )
    Y.sum_duplicates()
    Y.data[:] = 1
    return X, Y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    X, Y = make_data(args.rows)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.txt")
        start = time.perf_counter()
        write_bow(path, X, Y)
        write_s = time.perf_counter() - start
        size = os.path.getsize(path)
        del X, Y
        rss_before = resident_bytes()[1] // 1024
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            X2, Y2 = read_bow(path)
            times.append(time.perf_counter() - start)
            del X2, Y2
        rss_peak = resident_bytes()[1] // 1024
    revision = git_revision()
    row = {
        "bench": "read_bow",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "xmc": __version__,
        "git": revision,
        "numpy": np.__version__,
        "file_mb": round(size / 1e6, 1),
        "rows": args.rows,
        "read_s_median": round(statistics.median(times), 3),
        "write_s": round(write_s, 3),
        "read_mb_per_s": round(size / 1e6 / statistics.median(times), 1),
        "peak_rss_gib": round(rss_peak / 2**20, 2),
        "peak_rss_before_read_gib": round(rss_before / 2**20, 2),
    }
    append_row(RESULTS, row)


if __name__ == "__main__":
    main()
