"""The GPU suite on the CPU: ``--tiny`` runs every stage at toy shapes (kernels in the Triton interpreter,
a tiny random BERT staged by ``gpu_stage.py --tiny``), so a GPU session never finds a Python error first;
without ``--tiny`` the GPU stages are skipped, not crashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = ["environment", "kernel_tests", "kernel_bench", "train_step", "million_labels", "minilm_eurlex"]


def run(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def without_datasets(folder: Path) -> dict:
    """An environment in which ``import datasets`` fails, as on the GPU machine, whose image lacks it."""
    (folder / "datasets").mkdir(parents=True)
    (folder / "datasets" / "__init__.py").write_text(
        "raise ImportError('datasets is not installed on the GPU machine: keep the GPU path free of it')\n"
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
    }


def summary_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text``: per table, its rows split into cells (separator rows dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.slow
def test_tiny_suite_runs_every_stage(tmp_path):
    stage = tmp_path / "stage"
    done = run("gpu_stage.py", "--tiny", "--out", str(stage))
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((stage / "eurlex57k" / "meta.json").read_text())
    assert meta["train"]["documents"] == 48 and meta["max_length"] == 128

    # The staged ids are what the pipeline's tokenizer gives (the tokenized-text cache's settings).
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_stage import TokenArrays
    finally:
        sys.path.remove(str(BENCHMARKS))
    from xmc.data import read_label_names, read_lf_json
    from xmc.encoders import load_tokenizer

    small = BENCHMARKS.parent / "data" / "eurlex57k-small"
    names = read_label_names(small / "lbl.json.gz")
    texts = read_lf_json(small / "trn.json.gz", num_labels=len(names)).texts(("title", "content"))[:3]
    want = load_tokenizer(stage / "model")(texts, truncation=True, max_length=128)["input_ids"]
    batch = TokenArrays(stage / "eurlex57k" / "train.npz").batch(np.array([2, 0, 1]))
    for got, mask, ids in zip(
        batch["input_ids"], batch["attention_mask"], [want[2], want[0], want[1]], strict=True
    ):
        assert got[mask.bool()].tolist() == ids
    # Padded per batch to its longest row, with the pad id and mask 0 (as TokenInputs pads).
    np.savez(
        tmp_path / "short.npz", input_ids=np.array([[5, 6, 7, 0], [9, 0, 0, 0]], np.uint16), lengths=[3, 1]
    )
    with np.load(tmp_path / "short.npz") as arrays:
        labels = {"indptr": [0, 1, 1], "indices": [2], "num_labels": 4, "pad_id": 1}
        np.savez(tmp_path / "short.npz", **arrays, **labels)
    short = TokenArrays(tmp_path / "short.npz")
    assert short.Y.toarray().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert short.batch(np.array([1]))["input_ids"].tolist() == [[9]]
    got = short.batch(np.array([1, 0]))
    assert got["input_ids"].tolist() == [[9, 1, 1], [5, 6, 7]]
    assert got["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]

    out = tmp_path / "out"
    suite = ["--tiny", "--out", str(out), "--stage", str(stage), "--scratch", str(tmp_path / "s")]
    done = run("gpu_suite.py", *suite, env=without_datasets(tmp_path / "device-image"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    for entry in summary["stages"]:
        assert entry["status"] == "ok", (entry["name"], entry["reason"], entry.get("tail"))
        assert entry["figures"] and entry["seconds"] > 0, entry["name"]
    figures = {s["name"]: s["figures"] for s in summary["stages"]}
    tests = figures["kernel_tests"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] == tests["tests"]
    assert figures["kernel_bench"]["step dense / fixed"] > 0
    assert any(k.endswith("estimate GiB") for k in figures["train_step"])
    assert figures["million_labels"]["labels"] == 2000
    assert 0 <= figures["minilm_eurlex"]["test P@1"] <= 1
    assert figures["minilm_eurlex"]["documents"] == {"train": 43, "dev": 5, "test": 48}
    for rows in ("ceilings", "fixed_fanin", "train_step", "million_labels", "minilm_eurlex"):
        assert [json.loads(line) for line in (out / f"{rows}.jsonl").read_text().splitlines()], rows

    tables = summary_tables((out / "summary.md").read_text())
    assert tables[0][0] == ["#", "stage", "status", "s", "key figures (or why not)"]
    assert [row[2] for row in tables[0][1:]] == ["ok"] * len(STAGES)
    assert len(tables) == 6  # stages, kernels, classifier step, training steps, synthetic run, MiniLM
    assert all(len(row) == len(table[0]) for table in tables for row in table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_without_cuda_the_gpu_stages_are_skipped(tmp_path):
    out = tmp_path / "out"
    done = run("gpu_suite.py", "--out", str(out), "--stage", str(tmp_path / "nothing"), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("environment", "ok")] + [
        (name, "skipped") for name in STAGES[1:]
    ]
    assert {s["reason"] for s in stages[1:]} == {"no CUDA"}
    assert "| 2 | Kernel tests (-m gpu) | skipped | 0 | no CUDA |" in (out / "summary.md").read_text()


def test_failures_timeouts_and_the_budget_are_recorded(tmp_path):
    """A failing stage keeps its output's tail, a stage over its timeout is ended, the next stages still
    run, and a stage that needs more than the budget left is skipped."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(BENCHMARKS))

    def command(code: str):
        return lambda ctx: [[sys.executable, "-c", code]]

    Stage = gpu_suite.Stage
    stages = [
        Stage("boom", "Boom", 60, 0, command("print('before'); raise ValueError('kaput')"), lambda ctx: {}),
        Stage("slow", "Slow", 2, 0, command("import time; time.sleep(60)"), lambda ctx: {}),
        Stage("fine", "Fine", 60, 0, command("print('fine')"), lambda ctx: {"answer": 42}),
        Stage(
            "bad_rows", "Bad rows", 60, 0, command("pass"), lambda ctx: {"rows": 1, "problem": "an error row"}
        ),
        Stage("late", "Late", 60, 10_000, command("print('never')"), lambda ctx: {}),
    ]
    ctx = gpu_suite.Context(tmp_path, tmp_path / "scratch", tmp_path, True, False, "fixed_fanin", 1)
    summary = gpu_suite.run_suite(ctx, stages, budget_s=300)
    got = {s["name"]: s for s in summary["stages"]}
    assert got["boom"]["status"] == "failed" and got["boom"]["reason"].startswith("exit status 1")
    assert "before" in got["boom"]["tail"] and "ValueError: kaput" in got["boom"]["tail"]
    assert got["slow"]["status"] == "timeout" and got["slow"]["seconds"] < 30
    assert (got["fine"]["status"], got["fine"]["figures"]) == ("ok", {"answer": 42})
    assert (got["bad_rows"]["status"], got["bad_rows"]["reason"]) == ("failed", "an error row")
    assert got["late"]["status"] == "skipped" and got["late"]["reason"].startswith("budget")
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == summary["stages"]
    table = summary_tables((tmp_path / "summary.md").read_text())[0]
    assert [row[2] for row in table[1:]] == ["failed", "timeout", "ok", "failed", "skipped"]
