"""EURLEX57K with the bag-of-words encoder (CPU): ``configs/eurlex57k/bow.yaml`` (fixed fan-in over the
word-and-bigram TF-IDF vector) and its dense twin ``bow-dense.yaml``, trained on the full train split (10%
carved for model selection) and scored on dev, beside the peer's row (``bench_pecos_eurlex.py``).

Appends one JSON row per config to ``benchmarks/results/bow_eurlex57k.jsonl``: dev metrics (P@1/3/5,
nDCG@5, RP@5, PSP@5), carved-split P@1, train seconds, peak RSS, classifier bytes and the planner's
classifier training state (weights, gradients, optimizer moments and ids), device and versions.

    python benchmarks/bench_bow_eurlex.py [--data ../shared/data/eurlex57k] [--configs bow bow-dense]
    python benchmarks/bench_bow_eurlex.py --runs bow=RUN_DIR ...   # record runs trained with `xmc train`
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import append_row, git_revision

from xmc.config import Config, default_config_path, load_config
from xmc.data.text import read_label_names
from xmc.train.run import run_training

RESULTS = Path(__file__).parent / "results" / "bow_eurlex57k.jsonl"
STATE_PARTS = ("weights", "parameters", "gradients", "optimizer", "master_weights", "indices", "ids")


def classifier_state_bytes(
    config: Config, in_features: int, num_labels: int, classifier_type: str | None = None
) -> int:
    """The memory planner's classifier-side training state: weights, gradients, optimizer moments and ids
    of the classifier (a dense head and fixed fan-in tail included) and of the meta head or intermediate
    layer; ``classifier_type`` overrides ``config.classifier.type`` (the dense twin over the same input)."""
    import dataclasses

    from xmc.memory.planner import estimate, plan_from_config

    name = classifier_type or config.classifier.type
    plan = plan_from_config(config, num_labels, in_features)
    if name != config.classifier.type:
        plan = dataclasses.replace(plan, dense_head=0)  # the twin: one dense layer over all labels
    total = 0
    for key, value in estimate(plan, (name,))[name].items():
        side, _, part = key.partition(" ")  # "classifier tail_weights", "head optimizer", ...
        part = part.removeprefix("head_").removeprefix("tail_")  # a dense head's and a tail's parts
        if side in ("classifier", "head") and part in STATE_PARTS:
            total += value
    return total


def row_of(name: str, config: Config, metrics: dict) -> dict:
    dev, carved = metrics["test"], metrics.get("dev", {})
    width = config.encoder.dim or config.encoder.vocab_size  # the 200,000-term vocabulary fills its cap
    num_labels = len(read_label_names(config.data.labels))
    return {
        "bench": "bow_eurlex57k",
        "date": time.strftime("%Y-%m-%d"),
        "git": git_revision(),
        "device": metrics["device"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": name,
        "classifier": config.classifier.type,
        "dim": config.encoder.dim or "tfidf",
        "ngrams": config.encoder.ngrams,
        "vocab_size": config.encoder.vocab_size,
        "dropout": config.encoder.dropout,
        "fan_in": config.classifier.fan_in if config.classifier.type == "fixed_fanin" else None,
        "dense_head": config.classifier.dense_head,
        "head_fit": config.classifier.head_fit,
        "ids": config.classifier.ids,
        "centroid_fill": config.classifier.centroid_fill,
        # the rewiring schedule when on (null: the ids stay as they start)
        "set": (
            {
                key: getattr(config.classifier.set, key)
                for key in ("regrow", "grad_batches", "interval", "fraction", "end")
            }
            if config.classifier.type == "fixed_fanin" and config.classifier.set.enabled
            else None
        ),
        "classifier_state": config.train.classifier_state,
        **{key: round(100 * dev[key], 2) for key in ("P@1", "P@3", "P@5", "nDCG@5", "RP@5", "PSP@5")},
        "carved_dev_P@1": round(100 * carved["P@1"], 2) if carved else None,
        "carved_dev_P@5": round(100 * carved["P@5"], 2) if carved else None,
        "epochs": metrics["epochs"],
        "select": config.train.select,
        "dev_fraction": config.data.dev_fraction,
        "loss": config.train.loss,
        "classifier_optimizer": config.train.classifier_optimizer,
        "classifier_lr": config.train.classifier_lr,
        "classifier_weight_decay": config.train.classifier_weight_decay,
        "train_seconds": round(metrics["train_seconds"], 1),
        "head_fit_seconds": metrics.get("head_fit_seconds"),  # classifier.head_fit=svm, before training
        "peak_rss_bytes": metrics["peak_memory_bytes"].get("rss"),
        "classifier_bytes": metrics["classifier_bytes"],
        "classifier_state_bytes": classifier_state_bytes(config, width, num_labels),
        # a dense classifier over the same input (for the fixed fan-in rows, the 200,000-wide TF-IDF vector)
        "dense_twin_state_bytes": classifier_state_bytes(config, width, num_labels, "dense"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurlex57k"
    parser.add_argument("--data", default=str(default), help="folder with trn/dev/lbl .json.gz")
    parser.add_argument("--configs", nargs="+", default=["bow", "bow-dense"])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="NAME=RUN_DIR",
        help="record finished runs instead of training",
    )
    args = parser.parse_args()
    if args.runs:
        for item in args.runs:
            name, _, run = item.partition("=")
            config = load_config(Path(run) / "config.yaml")
            metrics = json.loads((Path(run) / "metrics.json").read_text())
            append_row(RESULTS, row_of(name, config, metrics))
        return
    folder = Path(args.data)
    for name in args.configs:
        config = load_config(
            default_config_path().parent / "eurlex57k" / f"{name}.yaml",
            [
                f"data.train={folder / 'trn.json.gz'}",
                f"data.test={folder / 'dev.json.gz'}",
                f"data.labels={folder / 'lbl.json.gz'}",
            ],
        )
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = run_training(config, run_dir, progress=False)
        append_row(RESULTS, row_of(name, config, metrics))


if __name__ == "__main__":
    main()
