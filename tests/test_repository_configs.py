"""The repository configs (``configs/repository/``): the classifier takes the fused loss where they train,
their counts follow one rule, and their classifier and optimizer settings train (a few steps on synthetic
data scaled down in L)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from xmc.classifiers.chunked import fused_loss_applies
from xmc.classifiers.meta import cluster_count
from xmc.config import load_config
from xmc.data.synth import SynthOptions, synthesize
from xmc.runtime import resolve_precision
from xmc.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = sorted((ROOT / "configs" / "repository").glob("*.yaml"))
ALL = sorted((ROOT / "configs").rglob("*.yaml"))
NAMES = [p.stem for p in REPOSITORY]


def _published(path: Path) -> tuple[int, int]:
    """(labels, training documents) from the config's first lines, e.g. '(3,956 labels; 15,449 train'."""
    head = " ".join(path.read_text().splitlines()[:3])
    found = re.search(r"\(([\d,]+) labels; ([\d,]+) train", head)
    assert found, f"{path.name}: the first lines name the set's labels and training documents"
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_takes_the_fused_loss_on_a_bf16_gpu(path):
    """The decision the runtime makes (:func:`fused_loss_applies`), for a CUDA device with bf16."""
    config = load_config(path)
    precision = resolve_precision(config.train.precision, torch.device("cuda"), bf16=True)
    assert precision in ("bf16", "no"), precision
    assert fused_loss_applies(config.train.fused_loss, fp16=precision == "fp16")


def test_fp16_is_the_one_precision_without_the_fused_loss():
    assert not fused_loss_applies(True, fp16=True)
    assert not fused_loss_applies(False, fp16=False)
    assert resolve_precision("auto", torch.device("cuda"), bf16=False) == "no"
    assert resolve_precision("auto", torch.device("cpu")) == "no"


@pytest.mark.parametrize("path", REPOSITORY, ids=NAMES)
def test_repository_counts_follow_the_published_sizes(path):
    """Clusters by one rule (L / 64 as a power of two); the steps per epoch in the SET comment are
    ceil(train / effective batch)."""
    labels, documents = _published(path)
    config = load_config(path)
    assert config.classifier.meta.clusters == cluster_count(labels)
    comment = re.search(r"interval: \d+\s+# ([\d,]+) (?:optimizer )?steps per epoch", path.read_text())
    comment = comment or re.search(r"([\d,]+) per epoch", path.read_text())
    assert comment, f"{path.name}: the SET interval's comment gives the steps per epoch"
    batch = config.train.batch_size * config.train.grad_accum
    assert int(comment[1].replace(",", "")) == math.ceil(documents / batch)


def test_cluster_count_rule():
    assert cluster_count(131_073) == 2048  # SPARTEX's count for LF-AmazonTitles-131K
    assert [cluster_count(n) for n in (1, 64, 100, 3_956, 2_812_281)] == [2, 2, 2, 64, 32768]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out,
        SynthOptions(
            num_labels=300,
            num_train=600,
            num_test=100,
            labels_per_doc=3,
            exponent=0.7,
            num_features=400,
            words_per_label=8,
            format="bow",
            seed=4,
        ),
        progress=False,
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", REPOSITORY, ids=NAMES)
def test_repository_classifier_settings_train(path, synth, tmp_path):
    """The config's classifier (type, fan-in, intermediate layer, SET, meta head) and its optimizer settings
    (loss, optimizer, learning rate, weight decay, batch, accumulation, schedule) on 600 synthetic
    documents of 300 labels, a bag-of-words encoder in place of the transformer, fp32 on the CPU, and
    rewiring every 3 steps: the training loss falls."""
    config = load_config(path)
    fan_in = config.classifier.fan_in
    overrides = [
        f"data.train={synth / 'train.txt'}",
        f"data.test={synth / 'test.txt'}",
        "data.format=bow",
        "data.labels=null",
        "data.exclude_test=null",
        "data.dev=null",
        "data.dev_fraction=0",
        "encoder.type=bow",
        f"encoder.dim={max(256, fan_in)}",
        "encoder.min_df=1",
        "train.epochs=4",
        "train.precision=no",
        "train.device=cpu",
        "classifier.set.interval=3",
        "classifier.meta.clusters=16",
        "classifier.meta.cutoff_epoch=3",
    ]
    if config.classifier.intermediate:
        overrides.append("classifier.intermediate=512")
    config = load_config(path, overrides)
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.9 * losses[0], (path.name, losses)
    assert metrics["test"]["P@1"] > metrics["baseline_most_frequent"]["P@1"], path.name
