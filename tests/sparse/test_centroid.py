"""classifier.ids=centroid: each label's fixed fan-in ids start at its documents' strongest inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc.nn import FixedFanInLinear
from xmc.sparse.centroid import centroid_ids, frequent_fill, init_centroid_ids, related_fill


def _case():
    # 3 documents over 6 features, 4 labels; label 3 has no document.
    X = np.array(
        [
            [0.9, 0.0, 0.1, 0.0, 0.0, 0.4],
            [0.0, 0.5, 0.2, 0.0, 0.0, 0.0],
            [0.3, 0.0, 0.0, 0.0, 0.7, 0.0],
        ],
        np.float32,
    )
    Y = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], np.float32))
    return X, Y


def test_picks_are_the_largest_centroid_coordinates_by_hand():
    X, Y = _case()
    # Label sums: l0 = d0 + d1 = [.9 .5 .3 0 0 .4]; l1 = d0 + d2 = [1.2 0 .1 0 .7 .4]; l2 = d2; l3 = 0.
    ids = centroid_ids(sp.csr_matrix(X), Y, 3)
    assert ids.tolist() == [[0, 1, 5], [0, 4, 5], [0, 4, -1], [-1, -1, -1]]
    assert (ids >= 0).sum(1).tolist() == [3, 3, 2, 0]


def test_dense_inputs_pick_by_magnitude_like_sparse_ones():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 40)).astype(np.float32)
    X[rng.random(X.shape) < 0.7] = 0
    Y = sp.csr_matrix((rng.random((50, 30)) < 0.1).astype(np.float32))
    dense_ids = centroid_ids(X, Y, 8)
    sparse_ids = centroid_ids(sp.csr_matrix(X), Y, 8)
    np.testing.assert_array_equal((dense_ids >= 0).sum(1), (sparse_ids >= 0).sum(1))
    S = np.abs(Y.T.toarray() @ X)
    for row in range(30):  # same sets (ties aside, absent in random data), each the row's largest |sum|
        picked = set(dense_ids[row][dense_ids[row] >= 0])
        assert picked == set(sparse_ids[row][sparse_ids[row] >= 0])
        if picked:
            assert min(S[row, list(picked)]) >= np.sort(S[row])[::-1][len(picked) - 1] - 1e-6


def test_layer_gets_centroid_ids_and_distinct_random_fills():
    X, Y = _case()
    layer = FixedFanInLinear(6, 4, 3, seed=5)
    weight = layer.weight.detach().clone()
    report = init_centroid_ids(layer, sp.csr_matrix(X), Y)
    ids = layer.indices.long()
    assert ids[0].tolist() == [0, 1, 5] and ids[1].tolist() == [0, 4, 5]
    assert ids[2, :2].tolist() == [0, 4]
    for row in ids:  # filled slots are real, distinct columns
        assert len(set(row.tolist())) == 3 and 0 <= int(row.min()) and int(row.max()) < 6
    assert report["filled"] == pytest.approx(4 / 12)
    assert torch.equal(layer.weight, weight)  # only the ids change


def test_frequent_fill_by_hand():
    X, Y = _case()
    # Column mass |X|.sum(0) = [1.2 .5 .3 0 .7 .4]: order 0, 4, 1, 5, 2, 3.
    ids = centroid_ids(sp.csr_matrix(X), Y, 3)
    filled = frequent_fill(ids, sp.csr_matrix(X))
    assert filled.tolist() == [[0, 1, 5], [0, 4, 5], [0, 4, 1], [0, 4, 1]]
    np.testing.assert_array_equal(frequent_fill(ids, X), filled)  # dense inputs alike
    layer = FixedFanInLinear(6, 4, 3, seed=5)
    report = init_centroid_ids(layer, sp.csr_matrix(X), Y, fill="frequent")
    assert layer.indices.long().tolist() == filled.tolist()
    assert report["filled"] == pytest.approx(4 / 12)


def test_frequent_fill_keeps_the_picks_and_adds_the_heaviest_missing_columns():
    rng = np.random.default_rng(3)
    X = sp.random(200, 500, density=0.02, random_state=4, dtype=np.float32).tocsr()
    Y = sp.csr_matrix((rng.random((200, 90)) < 0.02).astype(np.float32))
    K = 40
    ids = centroid_ids(X, Y, K)
    assert (ids < 0).any(axis=1).sum() > 30  # many rows need filling, some not at all
    filled = frequent_fill(ids, X)
    mass = np.asarray(abs(X).sum(axis=0)).ravel()
    order = np.argsort(-mass, kind="stable")
    for row in range(ids.shape[0]):
        n = int((ids[row] >= 0).sum())
        assert filled[row, :n].tolist() == ids[row, :n].tolist()  # the row's own picks stay, in place
        assert len(set(filled[row].tolist())) == K
        missing = [c for c in order if c not in set(ids[row, :n].tolist())][: K - n]
        assert filled[row, n:].tolist() == missing


def test_related_fill_by_hand():
    X, Y = _case()
    # Label 2 (document d2) needs one slot; its one co-occurring label is 1 (d2 again), whose mean
    # document (d0 + d2) / 2 = [.6 0 .05 0 .35 .2] holds columns 2 and 5 besides label 2's own 0 and 4:
    # column 5 (0.2) is taken, where the frequent fill would take column 1. Label 3 has no document, so
    # no related labels: the frequent fill takes all its slots.
    ids = centroid_ids(sp.csr_matrix(X), Y, 3)
    related = related_fill(ids, sp.csr_matrix(X), Y)
    assert related.tolist() == [[0, 1, 5], [0, 4, 5], [0, 4, 5], [-1, -1, -1]]
    np.testing.assert_array_equal(related_fill(ids, X, Y), related)  # dense inputs alike
    layer = FixedFanInLinear(6, 4, 3, seed=5)
    report = init_centroid_ids(layer, sp.csr_matrix(X), Y, fill="related")
    assert layer.indices.long().tolist() == [[0, 1, 5], [0, 4, 5], [0, 4, 5], [0, 4, 1]]
    assert report == pytest.approx({"filled": 4 / 12, "related": 1 / 12})


def test_related_fill_matches_a_direct_computation():
    rng = np.random.default_rng(7)
    X = sp.random(300, 400, density=0.02, random_state=8, dtype=np.float32).tocsr()
    Y = sp.csr_matrix((rng.random((300, 60)) < 0.04).astype(np.float32))
    K, m = 120, 4
    ids = centroid_ids(X, Y, K)
    got = related_fill(ids, X, Y, neighbours=m)
    Xd, Yd = X.toarray().astype(np.float64), Y.toarray()
    shared = Yd.T @ Yd
    docs = Yd.sum(axis=0)
    changed = 0
    for label in range(Yd.shape[1]):
        n = int((ids[label] >= 0).sum())
        own = set(ids[label, :n].tolist())
        if n == K:
            assert got[label].tolist() == ids[label].tolist()
            continue
        others = [j for j in range(Yd.shape[1]) if j != label and shared[label, j] > 0]
        others = sorted(others, key=lambda j: (-shared[label, j], j))[:m]
        mass = np.zeros(X.shape[1])
        for j in others:
            mass += shared[label, j] / docs[j] * Xd[Yd[:, j] > 0].sum(axis=0)
        picks = [
            c for c in sorted(range(X.shape[1]), key=lambda c: (-mass[c], c)) if mass[c] > 0 and c not in own
        ]
        want = ids[label, :n].tolist() + sorted(picks[: K - n])  # own picks in place, then related
        assert got[label, : len(want)].tolist() == want, label
        assert (got[label, len(want) :] == -1).all()
        changed += len(want) > n
        # the added columns never occur in the label's own documents
        assert not (Xd[Yd[:, label] > 0][:, want[n:]] != 0).any()
    assert changed > 20  # most labels that need filling get related columns
    filled = frequent_fill(got, X)
    assert all(len(set(row.tolist())) == K for row in filled) and filled.min() >= 0


def test_an_unknown_fill_is_refused():
    X, Y = _case()
    with pytest.raises(ValueError, match="fill must be one of random, frequent, related"):
        init_centroid_ids(FixedFanInLinear(6, 4, 3), sp.csr_matrix(X), Y, fill="zeros")


def test_wrong_shapes_are_refused():
    X, Y = _case()
    with pytest.raises(ValueError, match="5 labels, got 6 and 4"):
        init_centroid_ids(FixedFanInLinear(6, 5, 3), sp.csr_matrix(X), Y)
