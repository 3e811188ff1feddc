"""Every GPU check of a session in one command: the stages below, in priority order, within a time budget.

A lent GPU machine is rare and short (minutes, 10 a call), so one prepared call runs everything and a
failure costs one stage, not the session. Each stage runs in its own subprocesses with its own timeout;
a failure or a timeout is recorded with the tail of its output and the next stage runs; a stage is skipped
(reason "budget") when less than its minimum is left of ``--budget-s``. Stages:

1. ``environment``: GPU, versions, git revision, copy bandwidth, matmul rates (``bench_ceilings.py``);
2. ``kernel_tests``: the ``gpu``-marked tests of the kernel files, compiled (pytest, junit counts);
3. ``kernel_bench``: plain, grouped and the classifier step against dense, with floors, at Amazon-3M's
   label count (``bench_fixed_fanin.py``);
4. ``train_step``: end-to-end steps at the Amazon-3M shape (BERT-base-sized random encoder, length 128,
   micro-batch 32 x 4), dense and fixed fan-in K = 64, fp32 and bf16 classifier state, each peak beside
   ``xmc memory``'s estimate (``bench_train_step.py``);
5. ``million_labels``: ``xmc data synth`` with 1,000,000 labels (exponent 0.5) and a short ``xmc train``
   of the TF-IDF fixed fan-in recipe, beside the most-frequent-labels baseline;
6. ``minilm_eurlex``: MiniLM-L6 fine-tuned on EURLEX57K from ``.gpu-stage/`` (``bench_minilm_eurlex.py``;
   skipped, "not staged", without ``benchmarks/gpu_stage.py``'s folder).

Without CUDA the GPU stages are skipped ("no CUDA"). ``--tiny`` runs every stage at toy shapes (on the CPU
with the kernels in the Triton interpreter, a tiny random BERT, a few steps), so a Python error is found
on the CPU, never first on the GPU. ``--out`` receives ``summary.json`` (per stage: name, status ok /
failed / timeout / skipped, seconds, reason, key figures; rewritten after every stage), ``summary.md``
(tables for the README), each benchmark's rows (``*.jsonl``), ``kernel_tests.xml`` and one log per stage.
``docs/gpu-runbook.md`` has the device calls.

    python benchmarks/gpu_suite.py [--out DIR] [--budget-s 540] [--tiny] [--stage .gpu-stage]
        [--only STAGE ...] [--skip STAGE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpu_stage import REPO, STAGE, staged
from gpu_summary import write_markdown

HERE = Path(__file__).resolve().parent
KERNEL_TESTS = [
    "tests/kernels/test_fixed_fanin.py",
    "tests/kernels/test_grouped_fanin.py",
    "tests/kernels/test_fixed_fanin_loss.py",
    "tests/kernels/test_fill_distinct.py",
    "tests/kernels/test_rps.py",
]
TAIL_CHARS = 4000
# MiniLM epochs are fitted to the time left with these guesses for an H100-class GPU (an epoch: 1,266 steps
# of 32 documents of 128 tokens and the dev scoring; fixed: loading, building, scoring): replace them by
# the figures of the first run (train_seconds / epochs in minilm_eurlex.jsonl).
MINILM_EPOCH_S = 45
MINILM_FIXED_S = 60


@dataclass
class Context:
    """What the stages' commands and figures need."""

    out: Path
    scratch: Path
    stage: Path
    tiny: bool
    cuda: bool
    minilm_config: str
    minilm_epochs: int
    stage_s: float = 0.0  # seconds the current stage may take (its timeout, or the budget left)

    def rows(self, name: str) -> list[dict]:
        path = self.out / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Stage:
    """``commands`` run one after the other (cwd: the repository); ``figures`` reads their results (also
    after a failure, for what was written) and returns the key figures, with a ``problem`` entry when the
    results show a failure the exit status did not (an error row)."""

    name: str
    title: str
    timeout_s: float  # at most this long on a GPU (and the rest of the budget)
    min_s: float  # skipped ("budget") when less is left
    commands: Callable[[Context], list[list[str]]]
    figures: Callable[[Context], dict]
    gpu: bool = True  # skipped without CUDA unless --tiny
    precheck: Callable[[Context], str | None] = field(default=lambda ctx: None)


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


# ---- 1. environment --------------------------------------------------------------------------------


def environment_commands(ctx: Context) -> list[list[str]]:
    device = ["--device", "cuda" if ctx.cuda else "cpu"]
    return [python("bench_ceilings.py", *device, "--results", str(ctx.out / "ceilings.jsonl"))]


def environment_figures(ctx: Context) -> dict:
    row = ctx.rows("ceilings")[-1]
    keys = ("device", "memory_gib", "capability", "driver", "torch", "triton", "cuda", "python", "git")
    figures = {k: row[k] for k in keys if row.get(k) is not None}
    figures["copy_TB_s"] = row["copy_bytes_per_s"] / 1e12
    for kind in ("fp32", "tf32", "bf16"):
        if row.get(f"{kind}_flops"):
            figures[f"{kind}_TFLOP_s"] = row[f"{kind}_flops"] / 1e12
    return figures


# ---- 2. kernel tests -------------------------------------------------------------------------------


def kernel_test_commands(ctx: Context) -> list[list[str]]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    return [[*pytest, f"--junitxml={ctx.out / 'kernel_tests.xml'}", *KERNEL_TESTS]]


def kernel_test_figures(ctx: Context) -> dict:
    root = ET.parse(ctx.out / "kernel_tests.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if bad:
        counts["failing"] = bad[:20]
        counts["problem"] = f"{counts['failures']} failed, {counts['errors']} errors: {', '.join(bad[:5])}"
    if not ctx.cuda:
        counts["note"] = "no CUDA: the gpu-marked tests were collected and skipped"
    return counts


# ---- 3. kernel benchmark ---------------------------------------------------------------------------


def kernel_bench_commands(ctx: Context) -> list[list[str]]:
    args = ["--results", str(ctx.out / "fixed_fanin.jsonl")]
    if ctx.tiny:
        args += ["--labels", "64", "--fan-in", "4", "--group", "4", "--batch", "2", "--dim", "16"]
        args += ["--memory-fan-in", "4", "--rewire-fan-in", "4", "--step-labels", "64"]
    else:
        args += ["--labels", "2812281", "--fan-in", "32", "64", "128", "--group", "16"]
    args += ["--device", "cuda" if ctx.cuda else "cpu"]
    return [python("bench_fixed_fanin.py", *args)]


def kernel_bench_figures(ctx: Context) -> dict:
    """Headline figures at K = 64 (else the largest K run), bf16 weights; the rest is in the rows."""
    rows = ctx.rows("fixed_fanin")
    errors = [f"{r.get('bench')} {r.get('variant', '')} {r['error'][:200]}" for r in rows if "error" in r]
    kernels = [r for r in rows if r["bench"] == "kernel" and "error" not in r]
    fan_ins = sorted({r["K"] for r in kernels if r["K"]})
    K = 64 if 64 in fan_ins else (fan_ins[-1] if fan_ins else None)
    figures: dict = {"rows": len(rows), "K": K}
    for r in kernels:
        if r["K"] in (K, None) and r["weight_dtype"] == "bfloat16":
            what = "fwd" if r["what"] == "forward" else "fwd+bwd"
            figures[f"{r['variant'].removesuffix('-bfloat16-w')} {what} ms"] = r["ms"]
    steps = {r["variant"]: r for r in rows if r["bench"] == "classifier_step" and "error" not in r}
    for name, r in steps.items():
        figures[f"step {name} ms"] = r["ms"]
        if r["peak_allocated_gib"] is not None:
            figures[f"step {name} peak GiB"] = r["peak_allocated_gib"]
    if len(steps) == 2:
        figures["step dense / fixed"] = steps["dense"]["ms"] / steps["fixed"]["ms"]
    for r in rows:
        if r["bench"] == "set_rewiring":
            figures["SET rewiring ms"] = r["rewire_ms"]
    if errors:
        figures["problem"] = f"{len(errors)} rows with errors: " + "; ".join(errors[:5])
    return figures


# ---- 4. training steps -----------------------------------------------------------------------------


def train_step_commands(ctx: Context) -> list[list[str]]:
    args = ["--results", str(ctx.out / "train_step.jsonl"), "--classifiers", "dense", "fixed_fanin"]
    args += ["--classifier-state", "fp32", "bf16"]
    if ctx.tiny:
        args += ["--encoder", "bert-tiny", "--labels", "300", "--fan-in", "8", "--micro-batch", "2"]
        args += ["--accumulate", "2", "--seq-len", "8", "--steps", "2", "--warmup", "1"]
    else:
        args += ["--labels", "2812281", "--fan-in", "64", "--micro-batch", "32", "--accumulate", "4"]
        args += ["--seq-len", "128"]
    args += ["--device", "cuda" if ctx.cuda else "cpu"]
    return [python("bench_train_step.py", *args)]


def train_step_figures(ctx: Context) -> dict:
    figures: dict = {}
    for r in ctx.rows("train_step"):
        name = r["classifier"] + (f" K={r['fan_in']}" if r.get("fan_in") else "")
        name += f" {r['classifier_state']}"
        if "error" in r:
            figures[name] = r["error"][:120]
            continue
        figures[f"{name} step ms"] = r["step_ms"]
        if r.get("peak_allocated_gib") is not None:
            figures[f"{name} peak GiB"] = r["peak_allocated_gib"]
            figures[f"{name} peak/estimate"] = r["estimate_ratio"]
        figures[f"{name} estimate GiB"] = r["estimate_bytes"] / 2**30
    if not figures:
        figures["problem"] = "no rows written"
    return figures


# ---- 5. the million-label synthetic run ------------------------------------------------------------


def million_commands(ctx: Context) -> list[list[str]]:
    data, run = ctx.scratch / "synth1m", ctx.scratch / "run1m"
    shutil.rmtree(run, ignore_errors=True)
    if ctx.tiny:
        synth = ["--labels", "2000", "--train", "300", "--test", "60", "--features", "500"]
        train = ["classifier.fan_in=8", "train.epochs=1"]
    else:
        synth = ["--labels", "1000000", "--train", "40000", "--test", "5000"]
        train = ["classifier.fan_in=32", "train.epochs=2"]
    xmc = [sys.executable, "-m", "xmc"]
    return [
        [*xmc, "data", "synth", "--out", str(data), *synth, "--exponent", "0.5", "--no-progress"],
        [
            *xmc,
            "train",
            "--config",
            "configs/citeulike-t-tfidf.yaml",
            "--run-dir",
            str(run),
            f"data.train={data / 'train.txt'}",
            f"data.test={data / 'test.txt'}",
            *train,
        ],
    ]


def million_figures(ctx: Context) -> dict:
    run = ctx.scratch / "run1m"
    keep = ctx.out / "million_labels"
    keep.mkdir(exist_ok=True)
    for name in ("metrics.json", "config.yaml"):
        shutil.copy(run / name, keep / name)
    shutil.copy(ctx.scratch / "synth1m" / "synth.json", keep / "synth.json")
    metrics = json.loads((run / "metrics.json").read_text())
    test, base = metrics["test"], metrics["baseline_most_frequent"]
    peak = metrics["peak_memory_bytes"]
    figures = {
        "labels": json.loads((keep / "synth.json").read_text()).get("options", {}).get("num_labels"),
        "test P@1": test["P@1"],
        "test P@5": test["P@5"],
        "most frequent P@1": base["P@1"],
        "P@1 / most frequent": test["P@1"] / base["P@1"] if base["P@1"] else None,
        "epochs": metrics["epochs"],
        "train_seconds": metrics["train_seconds"],
        "examples_per_second": metrics["examples_per_second"],
        "peak GiB": (peak.get("allocated") or peak.get("rss", 0)) / 2**30,
        "dev P@1 by epoch": [h.get("dev/P@1") for h in metrics["history"]],
        "device": metrics["device"],
    }
    row = {"bench": "million_labels", **figures, "metrics": metrics}
    with open(ctx.out / "million_labels.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return figures


# ---- 6. MiniLM on EURLEX57K ------------------------------------------------------------------------


def minilm_commands(ctx: Context) -> list[list[str]]:
    fits = int((ctx.stage_s - MINILM_FIXED_S) / MINILM_EPOCH_S)
    epochs = ctx.minilm_epochs if ctx.tiny else max(1, min(ctx.minilm_epochs, fits))
    args = ["--stage", str(ctx.stage), "--config", ctx.minilm_config, "--epochs", str(epochs)]
    args += ["--results", str(ctx.out / "minilm_eurlex.jsonl"), "--device", "cuda" if ctx.cuda else "cpu"]
    if ctx.tiny:
        args += ["train.batch_size=8", "classifier.fan_in=8"]
    return [python("bench_minilm_eurlex.py", *args)]


def minilm_figures(ctx: Context) -> dict:
    r = ctx.rows("minilm_eurlex")[-1]
    return {
        "config": r["config"],
        "test P@1": r["test"]["P@1"],
        "test P@3": r["test"]["P@3"],
        "test P@5": r["test"]["P@5"],
        "most frequent P@1": r["baseline_most_frequent"]["P@1"],
        "dev P@1 by epoch": [h.get("dev/P@1") for h in r["history"]],
        "epochs": r["epochs"],
        "train_seconds": r["train_seconds"],
        "examples_per_second": r["examples_per_second"],
        "peak GiB": r["peak_allocated_gib"],
        "documents": r["documents"],
    }


def staged_here(ctx: Context) -> str | None:
    return staged(ctx.stage)


# In priority order: (name, title, timeout s, minimum s, commands, figures).
STAGES = [
    Stage(
        "environment", "Environment, ceilings", 90, 15, environment_commands, environment_figures, gpu=False
    ),
    Stage("kernel_tests", "Kernel tests (-m gpu)", 240, 60, kernel_test_commands, kernel_test_figures),
    Stage("kernel_bench", "Kernels vs dense", 180, 60, kernel_bench_commands, kernel_bench_figures),
    Stage("train_step", "Training steps, Amazon-3M", 180, 60, train_step_commands, train_step_figures),
    Stage("million_labels", "1M-label synthetic run", 240, 120, million_commands, million_figures),
    Stage(
        "minilm_eurlex", "MiniLM-L6, EURLEX57K", 300, 110, minilm_commands, minilm_figures, True, staged_here
    ),
]


def run_commands(commands: list[list[str]], log: Path, deadline: float, env: dict) -> tuple[str, str]:
    """Run ``commands`` in turn until one fails or ``deadline`` passes; (status, reason)."""
    with open(log, "w") as handle:
        for command in commands:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", "no time left for: " + " ".join(command[:3])
            # A session of its own, so a timeout ends the command and every process it started.
            proc = subprocess.Popen(
                command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=wait)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
                return "timeout", f"timed out after {left:.0f} s: {' '.join(command[:4])}"
            if rc != 0:
                return "failed", f"exit status {rc}: {' '.join(command[:4])}"
    return "ok", ""


def tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-TAIL_CHARS:]


def run_suite(ctx: Context, stages: list[Stage], budget_s: float) -> dict:
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env["XMC_CACHE"] = str(ctx.scratch / "cache")
    if not ctx.cuda:
        env["TRITON_INTERPRET"] = "1"
    summary = {
        "suite": "benchmarks/gpu_suite.py",
        "tiny": ctx.tiny,
        "cuda": ctx.cuda,
        "budget_s": budget_s,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "stages": [],
    }
    for stage in stages:
        left = budget_s - (time.monotonic() - started)
        entry = {"name": stage.name, "title": stage.title, "status": "skipped", "seconds": 0.0, "reason": ""}
        entry["figures"] = {}
        reason = None
        if stage.gpu and not ctx.cuda and not ctx.tiny:
            reason = "no CUDA"
        elif (pre := stage.precheck(ctx)) is not None:
            reason = pre
        elif left < stage.min_s:
            reason = f"budget: {left:.0f} s left, the stage needs at least {stage.min_s:.0f} s"
        if reason is None:
            log = ctx.out / f"{stage.name}.log"
            entry["log"] = log.name
            stage_started = time.monotonic()
            ctx.stage_s = min(stage.timeout_s, left)
            deadline = stage_started + ctx.stage_s
            print(f"[{stage.name}] running ({ctx.stage_s:.0f} s at most)", flush=True)
            status, reason = run_commands(stage.commands(ctx), log, deadline, env)
            try:  # also after a failure: what was written before it
                entry["figures"] = stage.figures(ctx)
            except Exception as err:  # a result that is not there or not as expected
                if status == "ok":
                    status, reason = "failed", f"results: {type(err).__name__}: {err}"
            problem = entry["figures"].pop("problem", None)
            if problem:
                status, reason = ("failed", problem) if status == "ok" else (status, f"{reason}; {problem}")
            entry["seconds"] = time.monotonic() - stage_started
            entry["status"] = status
            if status != "ok":
                entry["tail"] = tail(log)
        entry["reason"] = reason or ""
        summary["stages"].append(entry)
        line = f"[{stage.name}] {entry['status']} {entry['seconds']:.0f} s {entry['reason']}"
        print(line.rstrip(), flush=True)
        summary["elapsed_s"] = time.monotonic() - started
        (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        write_markdown(summary, ctx, ctx.out / "summary.md")
    return summary


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    names = [s.name for s in STAGES]
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-suite", help="results folder")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds for all stages (one 600 s call)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes; on the CPU without CUDA")
    parser.add_argument("--stage", type=Path, default=STAGE, help="gpu_stage.py's folder (MiniLM, EURLEX57K)")
    parser.add_argument("--only", nargs="+", choices=names, help="run just these stages")
    parser.add_argument("--skip", nargs="+", choices=names, default=[], help="leave these stages out")
    parser.add_argument("--minilm-config", default="fixed_fanin", help="configs/eurlex57k/ config name")
    parser.add_argument("--minilm-epochs", type=int, default=3, help="at most; fewer when time is short")
    parser.add_argument("--scratch", type=Path, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="xmc-gpu-suite-"))
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        out=args.out.resolve(),
        scratch=scratch.resolve(),
        stage=args.stage.resolve(),
        tiny=args.tiny,
        cuda=torch.cuda.is_available(),
        minilm_config=args.minilm_config,
        minilm_epochs=1 if args.tiny else args.minilm_epochs,
    )
    stages = [s for s in STAGES if (not args.only or s.name in args.only) and s.name not in args.skip]
    try:
        summary = run_suite(ctx, stages, args.budget_s)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    counts = {}
    for entry in summary["stages"]:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    print(f"{tally} in {summary['elapsed_s']:.0f} s: {args.out / 'summary.md'}")
    sys.exit(1 if counts.get("failed") or counts.get("timeout") else 0)


if __name__ == "__main__":
    main()
