"""Label clusters (representations, balanced 2-means, cache) and the auxiliary meta-classifier."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import xmc.classifiers.chunked as chunked
import xmc.clusters as clusters
from xmc.cache import cache_dir
from xmc.classifiers.meta import MetaHead, meta_positives, meta_weight
from xmc.clusters import balanced_clusters, cluster_labels, label_representations
from xmc.losses import Positives

# Five documents, three features, four labels; label 2 has no training documents, and the last
# document has no features (a zero row adds nothing, wherever it falls in a chunk).
X_TINY = np.array([[3, 4, 0], [0, 0, 2], [1, 0, 0], [0, 5, 0], [0, 0, 0]], np.float32)
Y_TINY = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.float32)


def _expected_tiny() -> np.ndarray:
    # Normalized rows: [.6, .8, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0].
    r2 = math.sqrt(2)
    return np.array([[0.6 / r2, 0.8 / r2, 1 / r2], [1 / r2, 0, 1 / r2], [0, 0, 0], [0, 1, 0]], np.float32)


@pytest.mark.parametrize("sparse", [False, True])
def test_representations_by_hand(sparse):
    X = sp.csr_matrix(X_TINY) if sparse else X_TINY
    Y = sp.csr_matrix(Y_TINY) if sparse else Y_TINY
    reps = label_representations(X, Y)
    assert reps.dtype == np.float32 and reps.shape == (4, 3)
    np.testing.assert_allclose(reps, _expected_tiny(), atol=1e-6)


def test_representations_chunked_like_whole(monkeypatch):
    X = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=1)
    Y = sp.random(300, 25, density=0.1, format="csr", dtype=np.float32, random_state=2)
    Y.data[:] = 1
    whole = label_representations(X, Y)
    monkeypatch.setattr(clusters, "GATHER_ELEMENTS", 40 * 3)  # 3 (document, label) pairs a chunk
    np.testing.assert_allclose(label_representations(X, Y), whole, atol=1e-6)
    dense = label_representations(X.toarray(), Y)
    np.testing.assert_allclose(dense, whole, atol=1e-6)


def test_projection_keeps_cosines_and_agrees_between_sparse_and_dense():
    X = sp.random(400, 5000, density=0.01, format="csr", dtype=np.float32, random_state=3)
    Y = sp.random(400, 120, density=0.03, format="csr", dtype=np.float32, random_state=4)
    exact = label_representations(X, Y, max_dim=5000)
    projected = label_representations(X, Y, max_dim=256, seed=7)
    assert projected.shape == (120, 256) and projected.dtype == np.float32
    has_docs = np.asarray(Y.sum(0)).ravel() > 0
    np.testing.assert_allclose(np.linalg.norm(projected[has_docs], axis=1), 1, atol=1e-5)
    assert not projected[~has_docs].any()
    # The sketch preserves inner products of unit vectors with a standard error of about 1/sqrt(256)
    # (mean absolute error ~0.05); a broken sketch (wrong signs, repeated columns) is far off.
    error = np.abs(projected @ projected.T - exact @ exact.T)
    assert error.mean() < 0.065 and error.max() < 0.4
    # Dense input goes through the same sketch; same seed, same result. Another seed, another sketch.
    np.testing.assert_allclose(label_representations(X.toarray(), Y, 256, seed=7), projected, atol=1e-5)
    assert not np.allclose(label_representations(X, Y, 256, seed=8), projected)
    odd = label_representations(X, Y, max_dim=100)  # widths that are not a multiple of the 8 blocks
    assert odd.shape == (120, 100) and (odd != 0).any(axis=0).all()


def test_representations_reject_mismatched_rows():
    with pytest.raises(ValueError, match="X has 4 rows but Y has 3"):
        label_representations(X_TINY[:4], Y_TINY[:3])


def _random_unit(num: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("num_clusters", [1, 2, 3, 7, 8, 64, 100, 299, 300, 450])
def test_cluster_sizes_differ_by_at_most_one(num_clusters):
    # Power of two or not, and even beyond L (then some clusters are empty): sizes L // K or L // K + 1.
    reps = _random_unit(300, 16, 0)
    reps[::7] = 0  # labels without training documents still get a cluster
    assignment = balanced_clusters(reps, num_clusters, seed=0)
    assert assignment.dtype == np.int64 and assignment.shape == (300,)
    assert assignment.min() >= 0 and assignment.max() < num_clusters
    sizes = np.bincount(assignment, minlength=num_clusters)
    assert sizes.min() == 300 // num_clusters and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize(("blobs", "per_blob"), [(8, 64), (6, 50), (16, 20)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_blobs_are_recovered_exactly(blobs, per_blob, seed):
    rng = np.random.default_rng(100 + seed)
    centers = _random_unit(blobs, 32, seed)
    blob_of = rng.permutation(np.repeat(np.arange(blobs), per_blob))
    reps = centers[blob_of] + 0.05 * rng.standard_normal((len(blob_of), 32)).astype(np.float32)
    reps /= np.linalg.norm(reps, axis=1, keepdims=True)
    assignment = balanced_clusters(reps, blobs, seed=seed)
    # Each cluster holds exactly one blob, and each blob lands in exactly one cluster.
    pairs = np.unique(np.stack([assignment, blob_of], 1), axis=0)
    assert len(pairs) == blobs
    assert len(np.unique(pairs[:, 0])) == blobs and len(np.unique(pairs[:, 1])) == blobs


def test_deterministic_per_seed_and_different_across_seeds():
    reps = _random_unit(512, 8, 3)  # no structure: the partition depends on the initial centroids
    first = balanced_clusters(reps, 4, seed=0)
    np.testing.assert_array_equal(balanced_clusters(reps, 4, seed=0), first)
    assert any(not np.array_equal(balanced_clusters(reps, 4, seed=s), first) for s in (1, 2, 3))


def test_degenerate_inputs():
    assert balanced_clusters(np.zeros((0, 4), np.float32), 3).shape == (0,)
    np.testing.assert_array_equal(balanced_clusters(np.zeros((5, 4), np.float32), 1), np.zeros(5))
    with pytest.raises(ValueError, match="num_clusters must be at least 1"):
        balanced_clusters(np.zeros((5, 4), np.float32), 0)


def test_cluster_labels_cache(tmp_path, monkeypatch):
    source = tmp_path / "train.txt"
    source.write_text("pretend training file\n")
    X = sp.random(200, 30, density=0.2, format="csr", dtype=np.float32, random_state=5)
    Y = sp.random(200, 40, density=0.05, format="csr", dtype=np.float32, random_state=6)
    first = cluster_labels(X, Y, 4, seed=0, sources=[source])
    np.testing.assert_array_equal(first, balanced_clusters(label_representations(X, Y), 4, seed=0))
    assert len(list(cache_dir("clusters").glob("*.npy"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(clusters, "balanced_clusters", refuse)
    np.testing.assert_array_equal(cluster_labels(X, Y, 4, seed=0, sources=[source]), first)
    for changed in ({"num_clusters": 5}, {"seed": 1}, {"sources": None}):
        args = {"num_clusters": 4, "seed": 0, "sources": [source]} | changed
        with pytest.raises(AssertionError, match="recomputed"):
            cluster_labels(X, Y, **args)
    source.write_text("pretend training file, edited\n")
    with pytest.raises(AssertionError, match="recomputed"):
        cluster_labels(X, Y, 4, seed=0, sources=[source])


def test_meta_positives_by_hand():
    cluster_of_label = torch.tensor([2, 0, 2, 1, 0, 1])
    positives = Positives.from_lists([[0, 2], [], [5, 1, 3], [4]], 6)
    meta = meta_positives(positives, cluster_of_label, 3)
    assert meta.num_labels == 3
    assert meta.indptr.tolist() == [0, 1, 1, 3, 4]
    assert meta.indices.tolist() == [2, 0, 1, 0]
    assert meta.indices.dtype == torch.int64
    with pytest.raises(ValueError, match="5 entries for 6 labels"):
        meta_positives(positives, cluster_of_label[:5], 3)


def test_meta_weight_schedule():
    assert meta_weight(0.0, 0.4, 8) == pytest.approx(0.4)
    assert meta_weight(2.0, 0.4, 8) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert meta_weight(4.0, 0.4, 8) == pytest.approx(0.2)
    assert meta_weight(8.0, 0.4, 8) == 0.0
    assert meta_weight(11.5, 0.4, 8) == 0.0
    assert meta_weight(0.0, 0.4, 0) == 0.0


@pytest.mark.parametrize("kind", ["bce", "squared_hinge"])
def test_meta_head_loss_matches_dense_loss_by_hand(kind, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 2)  # 2 clusters a chunk: the chunked path runs
    torch.manual_seed(0)
    cluster_of_label = torch.tensor([2, 0, 2, 1, 0, 1, 4, 3])
    head = MetaHead(7, cluster_of_label, dtype=torch.float64)
    assert head.num_clusters == 5 and head.num_labels == 8
    positives = Positives.from_lists([[0, 2], [], [5, 1, 3], [7, 6]], 8)
    h = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    got = head.loss(h, positives, kind)
    grads = torch.autograd.grad(got, [h, head.classifier.weight, head.classifier.bias])

    targets = torch.zeros(4, 5, dtype=torch.float64)
    targets[0, 2] = targets[2, 1] = targets[2, 0] = targets[3, 3] = targets[3, 4] = 1
    h2 = h.detach().clone().requires_grad_(True)
    logits = h2 @ head.classifier.weight.t() + head.classifier.bias
    if kind == "bce":
        want = F.binary_cross_entropy_with_logits(logits, targets)
    else:
        want = torch.clamp(1 - (2 * targets - 1) * logits, min=0).square().mean()
    expected = torch.autograd.grad(want, [h2, head.classifier.weight, head.classifier.bias])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)

    main = torch.tensor(2.0, dtype=torch.float64)
    assert head.mixed_loss(main, h, positives, 0.0, kind) is main
    torch.testing.assert_close(head.mixed_loss(main, h, positives, 0.25, kind), 0.75 * main + 0.25 * want)


def test_meta_head_keeps_clusters_in_its_state_dict():
    head = MetaHead(3, torch.tensor([1, 0, 1]), num_clusters=4)
    state = head.state_dict()
    assert state["cluster_of_label"].tolist() == [1, 0, 1]
    assert state["classifier.weight"].shape == (4, 3)
    assert head(torch.zeros(2, 3)).shape == (2, 4)
    with pytest.raises(ValueError, match="cluster ids must lie in 0..1"):
        MetaHead(3, torch.tensor([0, 2]), num_clusters=2)


@pytest.mark.slow
def test_scale_200k_labels():
    # About 2.5 s on an idle 2-core machine, up to ~15 s when other jobs share the cores; the bound
    # catches a change of complexity (a Python loop over labels takes minutes), not noise.
    reps = _random_unit(200_000, 64, 9)
    begin = time.perf_counter()
    assignment = balanced_clusters(reps, 1024, seed=0)
    elapsed = time.perf_counter() - begin
    sizes = np.bincount(assignment, minlength=1024)
    assert sizes.min() == 195 and sizes.max() == 196
    assert elapsed < 60, f"{elapsed:.1f} s"
