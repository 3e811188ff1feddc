"""CPU accuracy table: bag-of-words encoder + dense or fixed fan-in classifier on Bibtex and CiteULike-t.

Trains each (config, classifier) with a shipped config (``configs/<name>.yaml``: ``bibtex`` and
``citeulike-t`` project the TF-IDF vector to a learned D; the ``-tfidf`` variants feed the vector itself
to the classifier, ``-tfidf-dense`` with the dense classifier's own settings) on the repository split
in ``--data`` (default ``../shared/data``; the dataset is the config name up to ``-tfidf``) and appends
one JSON row per run to ``benchmarks/results/accuracy_bow.jsonl`` with P@1/3/5, classifier bytes, time
and device. The
reference row printed beside it is PECOS XR-Linear on the same splits (libpecos 1.2.8 defaults;
numbers from the project's issue tracker).

    python benchmarks/bench_accuracy_bow.py [--data ../shared/data] [--configs bibtex citeulike-t-tfidf]
        [--classifiers dense fixed_fanin]
    python benchmarks/bench_accuracy_bow.py --configs bibtex-tfidf-dense --classifiers dense
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import append_row, git_revision

from xmc.config import default_config_path, load_config
from xmc.train.run import run_training

RESULTS = Path(__file__).parent / "results" / "accuracy_bow.jsonl"
PECOS = {"bibtex": (63.18, 28.10), "citeulike-t": (60.60, 36.13)}  # XR-Linear P@1, P@5 (%)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--configs", nargs="+", default=["bibtex", "citeulike-t"])
    parser.add_argument("--classifiers", nargs="+", default=["dense", "fixed_fanin"])
    args = parser.parse_args()
    revision = git_revision()
    for name in args.configs:
        dataset = name.removesuffix("-dense").removesuffix("-tfidf")
        if dataset not in PECOS:
            raise SystemExit(
                f"--configs {name}: expected one of {', '.join(PECOS)}, "
                "optionally with -tfidf or -tfidf-dense"
            )
        folder = Path(args.data) / dataset
        for kind in args.classifiers:
            config = load_config(
                default_config_path().parent / f"{name}.yaml",
                [
                    f"data.train={folder / 'train.txt'}",
                    f"data.test={folder / 'test.txt'}",
                    f"classifier.type={kind}",
                ],
            )
            with tempfile.TemporaryDirectory() as run_dir:
                metrics = run_training(config, run_dir, progress=False)
            test = metrics["test"]
            row = {
                "bench": "accuracy_bow",
                "date": time.strftime("%Y-%m-%d"),
                "git": revision,
                "dataset": dataset,
                "config": name,
                "classifier": kind,
                "dim": config.encoder.dim or "tfidf",
                "fan_in": config.classifier.fan_in if kind == "fixed_fanin" else None,
                "ids": config.classifier.ids if kind == "fixed_fanin" else None,
                "weighting": config.encoder.weighting,
                "loss": config.train.loss,
                **{f"P@{k}": round(100 * test[f"P@{k}"], 2) for k in (1, 3, 5)},
                "pecos_P@1": PECOS[dataset][0],
                "pecos_P@5": PECOS[dataset][1],
                "classifier_bytes": metrics["classifier_bytes"],
                "train_seconds": round(metrics["train_seconds"], 1),
                "epochs": metrics["epochs"],
                "device": metrics["device"],
            }
            append_row(RESULTS, row)


if __name__ == "__main__":
    main()
