"""Accuracy on a real repository set (Bibtex, from ../shared/data): the bag-of-words encoder into
D = 256, then the dense classifier or the fixed fan-in classifier with K = 32 trained with SET.

The shipped ``configs/bibtex.yaml`` is tuned for accuracy (its D and K may change); this test pins the
acceptance shape (D = 256, K = 32) and the learning rate and epochs measured for it."""

from __future__ import annotations

import pytest
from conftest import shared_file

from xmc.config import default_config_path, load_config
from xmc.train.run import run_training


@pytest.mark.slow
def test_bibtex_dense_and_fixed_fanin(tmp_path):
    train, test = shared_file("bibtex", "train.txt"), shared_file("bibtex", "test.txt")
    config_path = default_config_path().parent / "bibtex.yaml"
    p1 = {}
    for kind in ("dense", "fixed_fanin"):
        overrides = [f"data.train={train}", f"data.test={test}", f"classifier.type={kind}"]
        overrides += ["encoder.dim=256", "classifier.fan_in=32"]
        overrides += ["train.classifier_lr=0.03", "train.epochs=30"]
        config = load_config(config_path, overrides)
        p1[kind] = run_training(config, str(tmp_path / kind), progress=False)["test"]["P@1"]
    assert p1["dense"] >= 0.55, p1
    assert p1["fixed_fanin"] >= p1["dense"] - 0.03, p1
