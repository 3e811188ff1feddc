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
