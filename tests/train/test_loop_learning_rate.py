"""A classifier learning rate means the same at any label count, for every backend and optimizer.

The loss is a mean over all B x L (document, label) pairs; SGD's classifier learning rate is per label (the
optimizer scales it by L, :func:`xmc.train.loop.build_optimizers`). SGD with momentum at the LF configs' lr
0.08 and weight decay 1e-4 must learn one planted problem at L and 10 L labels with every backend: before the
scaling its step shrank as 1 / L and none of these learned.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmc.classifiers import DenseClassifier, FixedFanInClassifier
from xmc.classifiers.rps import RPSClassifier
from xmc.config import Config
from xmc.losses import Positives
from xmc.model import XMCModel
from xmc.train.loop import build_optimizers

D, B, STEPS, LR = 32, 32, 120, 0.08


class _Inputs(nn.Module):
    """An encoder with nothing to learn: the batch's fixed features are the classifier input."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["x"]


def _classifier(kind: str, num_labels: int):
    if kind == "dense":
        return DenseClassifier(D, num_labels)
    if kind == "fixed_fanin":
        return FixedFanInClassifier(D, num_labels, 24, seed=1)
    return RPSClassifier(D, num_labels, compression=1.0, seed=1)


def _planted(num_labels: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents of one label each (uniform over labels); a document of label l is l's random unit
    prototype plus a little noise. Returns x (n, D) float32 and labels (n,) int64."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.functional.normalize(torch.randn(num_labels, D, generator=gen), dim=1) * 3
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return prototypes[labels] + 0.3 * torch.randn(n, D, generator=gen), labels


def _train_sgd(kind: str, num_labels: int) -> tuple[float, float, float]:
    """(first loss, last loss, train P@1) after STEPS steps of the training loop's SGD at LR."""
    torch.manual_seed(0)
    x, labels = _planted(num_labels, STEPS * B, seed=num_labels)
    model = XMCModel(_Inputs(), _classifier(kind, num_labels))
    config = Config()
    config.train.classifier_optimizer, config.train.classifier_lr = "sgd", LR
    (sgd,) = build_optimizers(config, model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    losses = []
    for step in range(STEPS):
        rows = slice(step * B, (step + 1) * B)
        positives = Positives.from_lists([[int(y)] for y in labels[rows]], num_labels)
        loss = model.loss({"x": x[rows]}, positives, "bce")
        loss.backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        _, top = model.topk({"x": x}, 1)
    p1 = float((top[:, 0] == labels).float().mean())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, p1


@pytest.mark.parametrize("kind", ["dense", "fixed_fanin", "rps"])
def test_sgd_learns_at_two_label_counts_with_one_learning_rate(kind):
    for num_labels in (20, 200):
        first, last, p1 = _train_sgd(kind, num_labels)
        # Chance is 1 / L, the most frequent label about 2 / L.
        assert p1 > 0.8, (kind, num_labels, p1)
        assert last < 0.25 * first, (kind, num_labels, first, last)


def test_one_sgd_step_moves_a_label_the_same_at_any_label_count():
    # Zero weights, the same two documents, label 0 positive in the first: label 0's step must not
    # depend on how many other labels the layer has (it was 1 / L of the per-label step).
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    steps = []
    for num_labels in (10, 1000):
        model = XMCModel(_Inputs(), DenseClassifier(2, num_labels))
        nn.init.zeros_(model.classifier.weight)
        nn.init.zeros_(model.classifier.bias)
        config = Config()
        config.train.classifier_optimizer, config.train.classifier_lr = "sgd", 0.5
        config.train.classifier_weight_decay = 0.0
        (sgd,) = build_optimizers(config, model)
        model.loss({"x": x}, Positives.from_lists([[0], []], num_labels), "bce").backward()
        sgd.step()
        steps.append(model.classifier.weight[0].detach().clone())
    # d(sum over labels, mean over the 2 documents)/dw_0 = ((0.5 - 1) x_0 + 0.5 x_1) / 2.
    want = -0.5 * ((0.5 - 1) * x[0] + 0.5 * x[1]) / 2
    for step in steps:
        torch.testing.assert_close(step, want)
