"""Smoke tests of the GPU benchmark scripts' CPU paths, so they still run when a GPU session comes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_train_step_benchmark_runs_a_tiny_shape_on_cpu(tmp_path):
    results = tmp_path / "rows.jsonl"
    args = ["--device", "cpu", "--encoder", "bert-tiny", "--labels", "300", "--fan-in", "8"]
    args += ["--micro-batch", "2", "--accumulate", "2", "--seq-len", "8", "--steps", "2", "--warmup", "1"]
    args += ["--classifier-state", "fp32", "bf16", "--results", str(results)]
    done = subprocess.run(
        [sys.executable, "bench_train_step.py", *args],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    got = [(r["classifier"], r.get("fan_in"), r["classifier_state"]) for r in rows]
    assert got == [
        ("dense", None, "fp32"),
        ("dense", None, "bf16"),
        ("fixed_fanin", 8, "fp32"),
        ("fixed_fanin", 8, "bf16"),
        ("rps", None, "fp32"),  # bf16 state serves dense and fixed fan-in only
    ]
    for row in rows:
        assert row["step_ms"] > 0 and row["examples_per_second"] > 0 and row["estimate_bytes"] > 0
        assert row["loss_first_last"][1] == row["loss_first_last"][1]  # not NaN


def test_lf_sgd_benchmark_records_a_short_run(tmp_path):
    """bench_lf_sgd.py at 20,000 labels and 2 steps: one row with a loss per step and both P@1s."""
    results = tmp_path / "rows.jsonl"
    args = ["--config", "../configs/repository/lf-amazontitles-131k.yaml", "--labels", "20000"]
    args += ["--steps", "2", "--test", "100", "--features", "2000", "--results", str(results)]
    done = subprocess.run(
        [sys.executable, "bench_lf_sgd.py", *args],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert (row["labels"], row["train_documents"], row["steps"], row["batch"]) == (20_000, 1024, 2, 512)
    assert len(row["loss_steps"]) == 2 and row["loss_first"] == row["loss_steps"][0] > 0
    assert row["classifier"]["fan_in"] == 128 and row["classifier"]["meta"]["clusters"] == 2048
    assert 0 < row["baseline_most_frequent"]["P@1"] <= 100 and row["peak_rss_bytes"] > 0
