"""The classifier interface: chunked losses, top-k, shards and state bytes for dense and fixed fan-in."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import xmc.classifiers.chunked as chunked
from xmc.classifiers import DenseClassifier, FixedFanInClassifier
from xmc.losses import Positives, dense_loss

B, D, L = 6, 17, 53


def _make(kind: str, **kwargs):
    torch.manual_seed(0)
    if kind == "dense":
        return DenseClassifier(D, L, dtype=torch.float64, **kwargs)
    return FixedFanInClassifier(D, L, 5, dtype=torch.float64, seed=3, **kwargs)


def _positives() -> Positives:
    rows = [[0, 5], [], [52], [1, 2, 3, 40], [7], [10, 11]]
    return Positives.from_lists(rows, L)


def test_positives_formats_agree():
    Y = sp.csr_matrix(np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], np.float32))
    a = Positives.from_csr(Y)
    b = Positives.from_lists([[1, 2], [], [0]], 3)
    assert torch.equal(a.indptr, b.indptr) and torch.equal(a.indices, b.indices)
    assert a.dense().tolist() == Y.toarray().tolist()
    assert a.dense(1, 3).tolist() == Y.toarray()[:, 1:3].tolist()
    with pytest.raises(ValueError, match="label ids must lie in 0..2"):
        Positives.from_lists([[3]], 3)


@pytest.mark.parametrize("kind", ["dense", "fixed_fanin"])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_chunked_loss_matches_full_logits(kind, loss, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", B * 7)  # 7 labels a chunk: 8 chunks, the last one short
    clf = _make(kind)
    assert clf.label_chunk(B) == 7
    h = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    positives = _positives()
    loss_value = clf.loss(h, positives, loss)
    grads = torch.autograd.grad(loss_value, [h, *clf.label_parameters()])
    h2 = h.detach().clone().requires_grad_(True)
    full = dense_loss(clf(h2), positives, loss)
    expected = torch.autograd.grad(full, [h2, *clf.label_parameters()])
    torch.testing.assert_close(loss_value, full.to(loss_value.dtype), rtol=1e-6, atol=0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_dense_over_mostly_zero_columns_matches_full_logits(monkeypatch):
    """Raw sparse features: forward and weight gradient over the batch's nonzero columns only, same
    loss and gradients (bias and input included) as the full product."""
    from xmc.classifiers.dense import active_columns

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", B * 7)
    torch.manual_seed(0)
    clf = DenseClassifier(40, L, dtype=torch.float64)
    h = torch.zeros(B, 40, dtype=torch.float64)
    h[:, [3, 17, 30]] = torch.randn(B, 3, dtype=torch.float64)
    h[0, 5] = 0.5
    assert active_columns(h).tolist() == [3, 5, 17, 30]
    h.requires_grad_(True)
    loss_value = clf.loss(h, _positives(), "bce")
    grads = torch.autograd.grad(loss_value, [h, *clf.label_parameters()])
    h2 = h.detach().clone().requires_grad_(True)
    full = dense_loss(torch.nn.functional.linear(h2, clf.weight, clf.bias), _positives(), "bce")
    expected = torch.autograd.grad(full, [h2, *clf.label_parameters()])
    torch.testing.assert_close(loss_value, full, rtol=1e-12, atol=0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(grads[1][:, 4].abs().max()) == 0.0  # a column no document holds
    scores, ids = clf.topk(h.detach(), 5)
    want_scores, want_ids = torch.topk(torch.nn.functional.linear(h.detach(), clf.weight, clf.bias), 5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores.float())


@pytest.mark.parametrize("kind", ["dense", "fixed_fanin"])
def test_topk_is_exact_with_ties_to_the_lower_id(kind, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", B * 10)
    clf = _make(kind)
    with torch.no_grad():  # coarse weights make many equal scores
        for p in clf.label_parameters():
            p.copy_(torch.round(p * 2) / 2)
    h = torch.round(torch.randn(B, D, dtype=torch.float64))
    scores, ids = clf.topk(h, 12)
    logits = clf(h).detach().float()
    for row in range(B):
        order = sorted(range(L), key=lambda j: (-float(logits[row, j]), j))[:12]
        assert ids[row].tolist() == order
        assert scores[row].tolist() == [float(logits[row, j]) for j in order]
    padded_scores, padded_ids = clf.topk(h, L + 3)
    assert padded_ids[:, L:].eq(-1).all() and torch.isinf(padded_scores[:, L:]).all()


@pytest.mark.parametrize("kind", ["dense", "fixed_fanin"])
def test_shards_cover_the_labels(kind):
    clf = _make(kind)
    h = torch.randn(B, D, dtype=torch.float64)
    parts = [clf.shard(rank, 3) for rank in range(3)]
    assert [p.label_offset for p in parts] == [0, 18, 36] and sum(p.num_labels for p in parts) == L
    torch.testing.assert_close(torch.cat([p(h) for p in parts], dim=1), clf(h))
    _, ids = parts[2].topk(h, 4)
    assert int(ids.min()) >= 36  # global label ids


def test_fixed_fanin_shard_equals_a_layer_built_with_its_offset():
    whole = FixedFanInClassifier(D, L, 5, seed=3)
    built = FixedFanInClassifier(D, 18, 5, seed=3, label_offset=18)
    shard = whole.shard(1, 3)
    for a, b in zip(shard.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_state_bytes_favour_the_sparse_layer():
    dense = DenseClassifier(768, 10_000).memory(batch_size=128)
    sparse = FixedFanInClassifier(768, 10_000, 32).memory(batch_size=128)
    assert dense["weights"] == 4 * (10_000 * 768 + 10_000)
    assert sparse["weights"] == 4 * (10_000 * 32 + 10_000)
    assert sparse["indices"] == 2 * 10_000 * 32  # int16 ids
    assert dense["optimizer"] == 2 * dense["weights"]
    assert sum(sparse.values()) < sum(dense.values()) / 5


@pytest.mark.parametrize("kind", ["bce", "squared_hinge"])
def test_sparse_chunk_loss_equals_the_dense_target_form(kind):
    from xmc.losses import Positives, chunk_loss_and_grad, dense_loss

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    lists = [[0, 5, 5, 29], [], [12], [3, 17, 40]]  # a repeat; 40 lies outside the first block
    positives = Positives.from_lists(lists, 50)
    for start, stop in ((0, 30), (10, 40)):
        block = logits[:, : stop - start].clone().requires_grad_(True)
        # The oracle: the mean loss over a dense 0/1 target block, by autograd, scaled to a sum.
        local = Positives.from_lists(
            [
                [i - start for i in set(row) if start <= i < stop]
                for row in ([0, 5, 29], [], [12], [3, 17, 40])
            ],
            stop - start,
        )
        want_total = dense_loss(block, local, kind) * block.numel()
        (want_grad,) = torch.autograd.grad(want_total, block)
        want_total, block = want_total.detach(), block.detach()
        total, grad = chunk_loss_and_grad(block, *positives.block(start, stop), kind, True)
        torch.testing.assert_close(total, want_total)
        torch.testing.assert_close(grad, want_grad)
        alone, none = chunk_loss_and_grad(block, *positives.block(start, stop), kind, False)
        torch.testing.assert_close(alone, want_total)
        assert none is None
