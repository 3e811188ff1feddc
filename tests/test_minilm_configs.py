"""The shipped MiniLM fine-tuning configs (configs/eurlex57k-small/minilm-*.yaml): a few optimizer steps of
the bundled pretrained encoder on real documents of the shipped subset lower the loss and move the encoder."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmc.config import load_config
from xmc.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "data" / "eurlex57k-small"
CONFIGS = sorted((ROOT / "configs" / "eurlex57k-small").glob("minilm-*.yaml"))
FINE_TUNED = [c for c in CONFIGS if c.stem != "minilm-features"]


def test_every_minilm_config_loads_and_fine_tunes_the_bundled_model():
    assert {c.stem for c in FINE_TUNED} == {
        "minilm-dense",
        "minilm-fixed-fanin",
        "minilm-head-tail",
        "minilm-intermediate",
        "minilm-meta",
    }
    for path in FINE_TUNED:
        config = load_config(path)
        assert config.encoder.type == "transformer" and config.encoder.name_or_path == "minilm", path.name
        assert Path(config.data.train).exists() and Path(config.data.test).exists(), path.name
    features = load_config(ROOT / "configs" / "eurlex57k-small" / "minilm-features.yaml")
    assert features.encoder.type == "features"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-fixed-fanin", "minilm-meta", "minilm-head-tail"])
def test_a_few_minilm_steps_lower_the_loss(tmp_path, name):
    """Six optimizer steps a run (48 real documents, batch 16, 2 epochs) with the config's optimizers,
    learning rates, schedules and SET rewiring: the second epoch's mean loss is below the first's, and the
    encoder's weights have left the pretrained ones."""
    with gzip.open(SUBSET / "trn.json.gz", "rt") as handle:
        lines = [next(handle) for _ in range(48)]
    small = tmp_path / "small.json"
    small.write_text("".join(lines))
    config = load_config(
        ROOT / "configs" / "eurlex57k-small" / f"{name}.yaml",
        [
            f"data.train={small}",
            f"data.test={small}",
            "data.dev_fraction=0",
            "train.epochs=2",
            "train.batch_size=16",
            "train.eval_every=1",
            "classifier.set.interval=2",
            "classifier.meta.clusters=8",
            "classifier.meta.cutoff_epoch=1",
        ],
    )
    metrics = run_training(config, run_dir=str(tmp_path / "run"), progress=False)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert metrics["optimizer_steps"] == 6

    from xmc.encoders import TransformerEncoder, resolve_model_path

    pretrained = TransformerEncoder.from_pretrained(resolve_model_path("minilm")).state_dict()
    trained = load_file(str(tmp_path / "run" / "best.safetensors"))
    name = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[f"encoder.{name}"], pretrained[name])
