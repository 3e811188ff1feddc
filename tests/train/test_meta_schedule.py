"""The meta head's loss weight as the training loop applies it: config -> loop -> the weight of each step."""

from __future__ import annotations

import math

import pytest
import torch

from xmc.classifiers.meta import cluster_count, meta_weight
from xmc.config import load_config
from xmc.data.synth import SynthOptions, synthesize
from xmc.model import XMCModel
from xmc.train.run import run_training

CONFIG = """
data: {{train: '{data}/train.txt', test: '{data}/test.txt', dev_fraction: 0.0, format: bow}}
encoder: {{type: bow, dim: 16, min_df: 1}}
classifier:
  type: fixed_fanin
  fan_in: 4
  set: {{enabled: false}}
  meta: {{enabled: true, lam0: 0.4, cutoff_epoch: 2}}
train: {{epochs: 3, batch_size: 25, grad_accum: {accum}, classifier_lr: 0.03, warmup: 0.0}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out, SynthOptions(num_labels=300, num_train=100, num_test=20, num_features=80, seed=2), progress=False
    )
    return out


@pytest.mark.parametrize("accum", [1, 2])
def test_the_loop_applies_the_configured_cosine_weight_and_stops_the_head_at_the_cutoff(
    tmp_path, data, monkeypatch, accum
):
    (tmp_path / "c.yaml").write_text(CONFIG.format(data=data, accum=accum))
    config = load_config(tmp_path / "c.yaml")
    assert config.classifier.meta.clusters == 0  # the default: the one rule's count
    weights, head = [], {}
    loss = XMCModel.loss

    def recording(self, batch, positives, kind, meta_weight=0.0):
        weights.append(meta_weight)
        return loss(self, batch, positives, kind, meta_weight)

    def snapshot(model, step, optimizers, scaler):  # before the update of optimizer step `step`
        head[step] = model.meta.classifier.weight.detach().clone()

    monkeypatch.setattr(XMCModel, "loss", recording)
    metrics = run_training(config, str(tmp_path / "run"), progress=False, step_hook=snapshot)
    micro_per_epoch = 4  # 100 documents in micro-batches of 25
    assert len(weights) == 3 * micro_per_epoch and metrics["optimizer_steps"] == 3 * micro_per_epoch // accum
    want = [meta_weight(i / micro_per_epoch, 0.4, 2) for i in range(len(weights))]
    assert weights == pytest.approx(want, abs=1e-12)
    assert weights[0] == pytest.approx(0.4)
    assert weights[micro_per_epoch] == pytest.approx(0.2)  # halfway to the cut-off: cos(pi / 2)
    assert all(w == 0 for w in weights[2 * micro_per_epoch :]) and all(w > 0 for w in weights[:8])
    assert all(a > b for a, b in zip(weights[:8], weights[1:8], strict=False))
    # From the cut-off the head gets no gradient: its weights stay as they were at the cut-off.
    steps = sorted(head)
    after = [s for s in steps if s >= 2 * micro_per_epoch // accum]
    assert len(after) >= 2 and all(torch.equal(head[s], head[after[0]]) for s in after)
    assert not torch.equal(head[steps[0]], head[after[0]])  # it did learn before
    # The cluster count the run used is the rule's, written into the run's config.
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.classifier.meta.clusters == cluster_count(300) == 4


def test_cluster_count_is_one_rule():
    assert cluster_count(131_073) == 2048 and cluster_count(4_271) == 64
    for num_labels in (2, 100, 52_946, 2_812_281):
        count = cluster_count(num_labels)
        assert count == max(2, 2 ** round(math.log2(num_labels / 64)))
