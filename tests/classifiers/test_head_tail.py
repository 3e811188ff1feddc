"""The dense head + fixed fan-in tail classifier: its loss and gradients against a masked dense layer, its
top-k, its state bytes, and its label order through training, export and ``xmc.load``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import xmc.classifiers.chunked as chunked
from xmc.classifiers.head_tail import HeadTailClassifier, frequency_order, semantic_order
from xmc.losses import Positives, dense_loss

B, D, L, K = 7, 13, 41, 4


def _positives() -> Positives:
    rows = [[0, 5, 40], [], [39], [1, 2, 3, 30], [7, 7], [10, 11], [20]]
    return Positives.from_lists(rows, L)


def _classifier(head: int, group: int = 1) -> HeadTailClassifier:
    torch.manual_seed(0)
    clf = HeadTailClassifier(D, L, head, K, seed=5, group=group).double()
    clf.set_order(np.random.default_rng(head + group).permutation(L))
    with torch.no_grad():  # biases away from their tiny init, so that their gradients matter
        for p in clf.parameters():
            if p.dim() == 1:
                p.normal_()
    return clf


def _masked_dense(clf: HeadTailClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """The same model as a dense (L, D) weight in label-id order, zero off the tail's connections."""
    weight = torch.zeros(L, D, dtype=torch.float64)
    bias = torch.zeros(L, dtype=torch.float64)
    n = clf.head_size
    if clf.head is not None:
        weight[clf.order[:n]] = clf.head.weight.detach()
        bias[clf.order[:n]] = clf.head.bias.detach()
    if clf.tail is not None:
        layer = clf.tail.layer
        rows = clf.order[n:]
        ids = layer.label_ids().long()
        weight[rows[:, None].expand_as(ids), ids] = layer.weight.detach()
        bias[rows] = layer.bias.detach()
    return weight.requires_grad_(True), bias.requires_grad_(True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
@pytest.mark.parametrize(("head", "group"), [(0, 1), (9, 1), (L, 1), (10, 3), (0, 4)])
def test_loss_and_gradients_equal_a_dense_layer_with_the_tail_mask(head, group, loss, fused, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", B * 6)  # several label chunks in each part
    clf = _classifier(head, group)
    clf.fused_loss = fused
    assert all(part.fused_loss == fused for part in clf.parts())
    h = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    value = clf.loss(h, _positives(), loss)
    params = clf.label_parameters()
    got = torch.autograd.grad(value, [h, *params])

    weight, bias = _masked_dense(clf)
    h2 = h.detach().clone().requires_grad_(True)
    want_value = dense_loss(h2 @ weight.t() + bias, _positives(), loss)
    grad_h, grad_w, grad_b = torch.autograd.grad(want_value, [h2, weight, bias])
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[0], grad_h, rtol=1e-10, atol=1e-14)
    want = []
    n = clf.head_size
    if clf.head is not None:
        want += [grad_w[clf.order[:n]], grad_b[clf.order[:n]]]
    if clf.tail is not None:
        rows, ids = clf.order[n:], clf.tail.layer.label_ids().long()
        want += [grad_w[rows[:, None].expand_as(ids), ids], grad_b[rows]]
    assert len(want) == len(got) - 1
    for g, w in zip(got[1:], want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    # forward speaks label ids too
    torch.testing.assert_close(clf(h.detach()), (h.detach() @ weight.t() + bias).detach())


@pytest.mark.parametrize(("head", "k"), [(0, 5), (9, 5), (9, 30), (L, 3), (9, L + 4)])
def test_topk_merges_both_parts_in_label_ids(head, k):
    clf = _classifier(head, 1)
    h = torch.randn(B, D, dtype=torch.float64)
    scores, ids = clf.topk(h, k)
    logits = clf(h).float()
    width = min(k, L)
    want = torch.topk(logits, width, dim=1)
    assert torch.equal(ids[:, :width], want.indices)
    torch.testing.assert_close(scores[:, :width], want.values)
    if k > L:  # padding past the label count, as every classifier
        assert (ids[:, L:] == -1).all() and torch.isinf(scores[:, L:]).all()


def test_head_and_tail_ties_go_to_the_lower_label_id():
    clf = HeadTailClassifier(3, 6, 2, 2)
    clf.set_order([5, 1, 0, 4, 3, 2])
    with torch.no_grad():
        for p in clf.parameters():
            p.zero_()
    _, ids = clf.topk(torch.ones(1, 3), 6)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_state_bytes_count_both_parts_and_match_the_built_layer():
    parts = HeadTailClassifier.state_bytes(256, 52_946, head=6_000, fan_in=32, optimizer="adamw")
    dense = 4 * 4 * 52_946 * 257  # weights, gradients and two AdamW moments, fp32
    state = sum(v for k, v in parts.items() if k not in ("logits", "chunk_gradient"))
    assert state < 0.3 * dense
    assert parts["head_weights"] == 4 * 6_000 * 257 and parts["tail_weights"] == 4 * 46_946 * 33
    clf = HeadTailClassifier(16, 50, 7, 3)
    built = clf.memory()
    weights = sum(p.numel() * 4 for p in clf.parameters())
    assert built["head_weights"] + built["tail_weights"] == weights
    assert built["tail_indices"] == clf.tail.layer.indices.numel() * clf.tail.layer.indices.element_size()
    assert built["label_order"] == clf.order.nbytes + clf.position.nbytes


def test_orders_put_the_head_first_and_the_tail_in_related_groups():
    # labels 0..5 in two topics of three over disjoint words; label 6 is the most frequent
    rng = np.random.default_rng(0)
    docs, labels = [], []
    for _ in range(200):
        topic = rng.integers(2)
        words = rng.choice(np.arange(10) + 10 * topic, 4, replace=False)
        docs.append(np.bincount(words, minlength=20))
        labels.append(np.bincount([*(rng.choice(3, 2, replace=False) + 3 * topic), 6], minlength=7))
    X, Y = sp.csr_matrix(np.array(docs, np.float32)), sp.csr_matrix(np.array(labels, np.float32))
    order = frequency_order(Y, 1)
    assert order[0] == 6 and sorted(order) == list(range(7))
    semantic = semantic_order(order, 1, X, Y, group=3)
    assert semantic[0] == 6
    assert {frozenset(semantic[1:4]), frozenset(semantic[4:7])} == {
        frozenset({0, 1, 2}),
        frozenset({3, 4, 5}),
    }


def test_label_sharding_and_wrong_settings_say_what_to_do(caplog):
    import logging

    from xmc.classifiers import DenseClassifier
    from xmc.config import ClassifierConfig
    from xmc.model import build_classifier

    with pytest.raises(ValueError, match="train.parallel=data"):
        HeadTailClassifier(8, 20, 5, 2).shard(0, 2)
    # Fixed fan-in options that another type ignores, with a warning (the default config has a head).
    with caplog.at_level(logging.WARNING, logger="xmc.model"):
        dense = build_classifier(ClassifierConfig(type="dense", dense_head=4, head_fit="svm"), 8, 20, 0)
    assert isinstance(dense, DenseClassifier) and dense.num_labels == 20
    assert "classifier.type=dense ignores" in caplog.text and "dense_head=4" in caplog.text
    with pytest.raises(ValueError, match="exceeds the 20 labels"):
        build_classifier(ClassifierConfig(dense_head=21, fan_in=2), 8, 20, 0)
    with pytest.raises(ValueError, match="permutation"):
        HeadTailClassifier(8, 5, 2, 2).set_order([0, 1, 2, 3, 3])


@pytest.mark.parametrize("bias", [True, False])
def test_training_state_bytes_of_every_classifier(bias):
    """What metrics.json reports as classifier_state_bytes: weights, ids and their view, gradients and
    optimizer state; an RPS layer without a bias has no label-indexed parameter at all."""
    from xmc.classifiers import DenseClassifier, RPSClassifier
    from xmc.model import XMCModel

    encoder = torch.nn.Linear(3, 8)
    encoder.out_features = 8
    dense = XMCModel(encoder, DenseClassifier(8, 50, bias=bias)).training_state_bytes("sgd")
    assert dense == 3 * 4 * (50 * 8 + 50 * bias)  # weights, gradients, SGD momentum
    rps = XMCModel(encoder, RPSClassifier(8, 50, bias=bias, compression=4)).training_state_bytes("sgd")
    assert rps == 3 * 4 * (100 + 50 * bias)
    head_tail = XMCModel(encoder, HeadTailClassifier(8, 50, 5, 2, bias=bias)).training_state_bytes("adamw")
    assert head_tail < 4 * 4 * 50 * 9 and head_tail > 4 * 4 * (5 * 8 + 45 * 2)
