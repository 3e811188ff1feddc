"""Do an LF config's classifier and SGD settings train at the config's label count? (CPU benchmark)

Issue 24 asks that the LF configs' SGD settings train (the loss falls and test P@1 beats predicting the most
frequent training labels) on synthetic data of their label-count order, in a short CPU run. This script:

1. writes a synthetic bag-of-words set (:mod:`xmc.data.synth`, as ``tests/test_repository_configs.py``
   does: power-law label frequencies, every label planting words of its own signature in its documents)
   with the config's label count L, read from the config's header, ``--steps`` x batch training documents
   and ``--test`` test documents; nothing of size N x L is ever dense;
2. trains the config as it is (classifier, fan-in, SET, meta head, loss, SGD learning rate and weight
   decay, batch, encoder learning rate and dropout) for one epoch, i.e. ``--steps`` optimizer steps, with
   these changes only: a bag-of-words encoder with a learned ``--dim``-wide projection in place of the
   transformer (no pretrained model on the machine), fp32 on the CPU, and the run's length (the cosine
   schedule is stretched over the short run; SET rewires only if ``--steps`` exceeds its interval); ``--set``
   adds overrides for diagnosis, recorded in the row as deviations;
3. appends one row to ``benchmarks/results/lf_sgd_synthetic.jsonl``: the classifier loss (mean BCE over the
   B x L pairs) of every step, the same loss on fixed training and held-out (test) documents before the
   first step and after the last, test P@1/3/5 of the model and of the most-frequent-labels baseline, wall
   time, peak resident memory, date, git revision, device and the command.

A CPU benchmark: run it niced on one thread. At L = 1,305,265, B = 512 and K = 128 a step takes ~85 s on one
thread of the 2-core development machine, building the layer ~5 min and clustering the labels ~2 min, the
whole run of 10 steps ~25 min at 3.6 GiB peak RSS:

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_lf_sgd.py \\
        --config configs/repository/lf-amazontitles-1.3m.yaml --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import append_row, environment

import xmc.train.run
from xmc.classifiers.fixed_fanin import FixedFanInClassifier
from xmc.config import load_config
from xmc.data.synth import SynthOptions, synthesize
from xmc.losses import Positives
from xmc.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "lf_sgd_synthetic.jsonl"


def config_label_count(path: Path) -> int:
    """L from the config's first lines, e.g. '(1,305,265 labels; 2,248,619 train / ...'."""
    head = " ".join(path.read_text().splitlines()[:3])
    found = re.search(r"\(([\d,]+) labels;", head)
    if not found:
        raise SystemExit(f"{path}: no '(N labels; ...' in its first lines: pass --labels")
    return int(found[1].replace(",", ""))


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@torch.no_grad()
def split_loss(recipe, split_name: str, documents: int) -> float:
    """The classifier loss (the config's, mean over B x L) of the model as it stands on the first
    ``documents`` documents of a split, in eval mode (no dropout), batch by batch as training computes it."""
    model, split = recipe.model, recipe.data.splits[split_name]
    inputs, kind = recipe.inputs[split.source], recipe.config.train.loss
    batch_size = recipe.config.train.batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(documents, len(split.rows)), batch_size):
        stop = min(start + batch_size, documents, len(split.rows))
        rows = np.arange(start, stop)
        batch = {k: v.to(recipe.device) for k, v in inputs.batch(split.rows[rows]).items()}
        positives = Positives.from_csr(split.Y[rows], device=recipe.device)
        total += float(model.classifier.loss(model.represent(batch), positives, kind)) * len(rows)
        count += len(rows)
    model.train(was_training)
    return total / count


@contextlib.contextmanager
def split_losses(documents: int):
    """{"test": (before, after), "train": (before, after)}: :func:`split_loss` on the first ``documents``
    test and training documents just before training starts and just after it ends (the training loop
    ``xmc.train.run`` calls, wrapped)."""
    original = xmc.train.run.train
    values: dict[str, tuple[float, float]] = {}

    def train(recipe, *args, **kwargs):
        before = {name: split_loss(recipe, name, documents) for name in ("test", "train")}
        position = original(recipe, *args, **kwargs)
        values.update({name: (before[name], split_loss(recipe, name, documents)) for name in before})
        return position

    xmc.train.run.train = train
    try:
        yield values
    finally:
        xmc.train.run.train = original


@contextlib.contextmanager
def recorded_losses():
    """The value of every training-mode call of the fixed fan-in classifier's loss (the main loss, not the
    meta head's), in call order: one per step at ``train.grad_accum`` 1. One host sync a call."""
    original = FixedFanInClassifier.loss
    values: list[float] = []

    def loss(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        if self.training:
            values.append(float(value.detach()))
        return value

    FixedFanInClassifier.loss = loss
    try:
        yield values
    finally:
        FixedFanInClassifier.loss = original


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs/repository/lf-amazontitles-1.3m.yaml")
    parser.add_argument("--labels", type=int, default=0, help="L (default: the config's count)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps = training documents / batch")
    parser.add_argument("--test", type=int, default=2000, help="test documents")
    parser.add_argument(
        "--held-out",
        type=int,
        default=512,
        help="test (and training) documents the loss is measured on before and after training",
    )
    parser.add_argument("--dim", type=int, default=768, help="bow projection width (DistilBERT's 768)")
    # The synthetic data of tests/test_repository_configs.py: 3 labels a document, 8 signature words each;
    # exponent 1 puts the most frequent label in ~20% of documents at a million labels, as 0.7 does at 300.
    parser.add_argument("--labels-per-doc", type=float, default=3.0)
    parser.add_argument("--exponent", type=float, default=1.0)
    parser.add_argument("--features", type=int, default=50_000)
    parser.add_argument("--words-per-label", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override on top (a deviation from the config, for diagnosis; recorded in the row)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.perf_counter()
    base = load_config(args.config)
    labels = args.labels or config_label_count(args.config)
    batch = base.train.batch_size * base.train.grad_accum
    synth = SynthOptions(
        num_labels=labels,
        num_train=args.steps * batch,
        num_test=args.test,
        labels_per_doc=args.labels_per_doc,
        exponent=args.exponent,
        num_features=args.features,
        words_per_label=args.words_per_label,
        format="bow",
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="bench_lf_sgd_") as tmp:
        data = Path(tmp) / "data"
        written = synthesize(data, synth, progress=False)
        overrides = [
            f"data.train={data / 'train.txt'}",
            f"data.test={data / 'test.txt'}",
            "data.format=bow",
            "data.labels=null",
            "data.exclude_test=null",
            "data.dev=null",
            "data.dev_fraction=0",
            "encoder.type=bow",
            f"encoder.dim={args.dim}",
            "train.epochs=1",
            "train.precision=no",
            "train.device=cpu",
            *args.set,
        ]
        config = load_config(args.config, overrides)
        with recorded_losses() as losses, split_losses(args.held_out) as fixed:
            metrics = run_training(config, str(Path(tmp) / "run"), progress=False)

    test, baseline = metrics["test"], metrics["baseline_most_frequent"]
    c, t = config.classifier, config.train
    row = {
        "bench": "lf_sgd_synthetic",
        "config": shown(args.config),
        "deviations": args.set,  # overrides beyond the encoder, precision and run length
        "labels": labels,
        "train_documents": written.documents["train"],
        "test_documents": written.documents["test"],
        "synth": {
            "labels_per_doc": args.labels_per_doc,
            "exponent": args.exponent,
            "features": args.features,
            "words_per_label": args.words_per_label,
            "seed": args.seed,
            "top_label_share": written.max_probability,
        },
        "encoder": {"type": "bow", "dim": args.dim, "lr": t.encoder_lr, "dropout": config.encoder.dropout},
        "classifier": {
            "type": c.type,
            "fan_in": c.fan_in,
            "set": {"interval": c.set.interval, "prune": c.set.prune, "fraction": c.set.fraction},
            "rewirings": metrics["history"][-1].get("rewirings", 0) if metrics["history"] else 0,
            "meta": {"clusters": c.meta.clusters, "lam0": c.meta.lam0, "cutoff_epoch": c.meta.cutoff_epoch}
            if c.meta.enabled
            else None,
        },
        "loss": t.loss,
        "optimizer": f"{t.classifier_optimizer} (momentum 0.9)"
        if t.classifier_optimizer == "sgd"
        else t.classifier_optimizer,
        "classifier_lr_per_label": t.classifier_lr,  # docs/training.md
        "classifier_weight_decay": t.classifier_weight_decay,
        "batch": batch,
        "steps": metrics["optimizer_steps"],
        "loss_first": round(losses[0], 6) if losses else None,
        "loss_last": round(losses[-1], 6) if losses else None,
        "loss_steps": [round(v, 6) for v in losses],
        # the same loss (eval mode) on fixed documents before the first step and after the last: the step
        # losses above are each on a different batch, too noisy to show a small fall. "train": the first
        # --held-out training documents (each seen once in the epoch), "held_out": as many test documents
        "fixed_documents": args.held_out,
        "train_loss_before": fixed["train"][0],
        "train_loss_after": fixed["train"][1],
        "train_loss_falls": fixed["train"][1] < fixed["train"][0],
        "held_out_loss_before": fixed["test"][0],
        "held_out_loss_after": fixed["test"][1],
        "held_out_loss_falls": fixed["test"][1] < fixed["test"][0],
        "test": {k: round(100 * test[k], 2) for k in ("P@1", "P@3", "P@5")},
        "baseline_most_frequent": {k: round(100 * baseline[k], 2) for k in ("P@1", "P@3", "P@5")},
        "beats_baseline": test["P@1"] > baseline["P@1"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "run_seconds": round(metrics["total_seconds"], 1),  # build, clustering, training, test predictions
        "wall_seconds": round(time.perf_counter() - started, 1),  # with the data generation
        "peak_rss_bytes": metrics["peak_memory_bytes"].get("rss"),
        **environment(torch.device("cpu")),
        "cpu_cores": os.cpu_count(),
        "niceness": os.nice(0),
        "command": shlex.join(
            [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "nice", "-n", str(os.nice(0))]
            + ["python", *sys.argv]
        ),
    }
    append_row(args.results, row)


if __name__ == "__main__":
    main()
