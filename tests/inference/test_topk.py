"""xmc.inference.topk against a full stable sort, including ties, NaN, chunking and padding; plus a memory
test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xmc.inference.topk import TopKAccumulator, chunk_shape, topk_chunked, topk_dense


def reference(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full stable sort per row: score descending (as float32), ties by lower id, NaN last."""
    values = np.asarray(scores, dtype=np.float32)
    n, num_labels = values.shape
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    out_ids = np.full((n, k), -1, dtype=np.int32)
    for r in range(n):
        nan = np.isnan(values[r])
        # np.lexsort: the last key is the primary one.
        order = np.lexsort((np.arange(num_labels), -np.where(nan, 0, values[r]), nan))[:k]
        out_ids[r, : order.size] = order
        out_scores[r, : order.size] = values[r, order]
    return out_scores, out_ids


def tied_scores(rng: np.random.Generator, n: int, num_labels: int) -> np.ndarray:
    """Scores rounded to one decimal (many ties), with some -inf, -0.0 and NaN."""
    scores = np.round(rng.standard_normal((n, num_labels)), 1)
    for value, fraction in ((-np.inf, 0.03), (-0.0, 0.03), (np.nan, 0.03)):
        scores[rng.random(scores.shape) < fraction] = value
    return scores


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.float32 and got[1].dtype == np.int32
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])  # NaN == NaN for this helper


@pytest.mark.parametrize("seed", range(6))
def test_dense_matches_stable_sort_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, num_labels = int(rng.integers(1, 30)), int(rng.integers(1, 3000))
    k = int(rng.integers(1, 60))
    scores = tied_scores(rng, n, num_labels)
    assert_same(topk_dense(scores, k), reference(scores, k))


@pytest.mark.parametrize("seed", range(6))
def test_chunked_matches_stable_sort(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, num_labels = int(rng.integers(1, 40)), int(rng.integers(1, 2500))
    k = int(rng.integers(1, 50))
    max_elements = int(rng.integers(7, 5000))  # tiles that do not divide N or L
    scores = tied_scores(rng, n, num_labels)
    calls = []

    def score_fn(r0: int, r1: int, l0: int, l1: int) -> np.ndarray:
        calls.append((r1 - r0) * (l1 - l0))
        return scores[r0:r1, l0:l1]

    got = topk_chunked(score_fn, n, num_labels, k, max_elements=max_elements, progress=False)
    assert_same(got, reference(scores, k))
    assert max(calls) <= max_elements
    assert sum(calls) == n * num_labels


def test_small_row_blocks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large chunks are merged in blocks of rows; blocks of one or a few rows must not change the result.
    rng = np.random.default_rng(11)
    scores = tied_scores(rng, 13, 900)
    monkeypatch.setattr("xmc.inference.topk._BLOCK_ELEMENTS", 2000)  # 2 rows per block of 900 labels
    assert_same(topk_dense(scores, 7), reference(scores, 7))


def test_ties_at_the_kth_boundary_go_to_the_lower_id() -> None:
    # All 10 labels tie; any k must take ids 0..k-1, also when labels arrive high ids first.
    scores = np.zeros((2, 10), dtype=np.float32)
    acc = TopKAccumulator(2, 3)
    acc.update(scores[:, 5:], slice(0, 2), 5)
    acc.update(scores[:, :5], slice(0, 2), 0)
    assert acc.result()[1].tolist() == [[0, 1, 2], [0, 1, 2]]
    # -0.0 ties with 0.0, and a larger score wins whatever its id.
    s, ids = topk_dense(np.array([[0.0, -0.0, 0.5, 0.0]]), 3)
    assert ids.tolist() == [[2, 0, 1]] and s.tolist() == [[0.5, 0.0, 0.0]]


def test_nan_ranks_after_minus_inf_and_padding_after_nan() -> None:
    s, ids = topk_dense(np.array([[np.nan, -np.inf, 1.0]]), 5)
    assert ids.tolist() == [[2, 1, 0, -1, -1]]
    assert s[0, 0] == 1.0 and s[0, 1] == -np.inf and np.isnan(s[0, 2]) and s[0, 3:].tolist() == [-np.inf] * 2


def test_k_larger_than_labels_pads() -> None:
    rng = np.random.default_rng(7)
    scores = tied_scores(rng, 5, 3)
    got = topk_chunked(lambda a, b, c, d: scores[a:b, c:d], 5, 3, 8, max_elements=2, progress=False)
    assert_same(got, reference(scores, 8))
    assert (got[1][:, 3:] == -1).all() and (got[0][:, 3:] == -np.inf).all()


def test_accumulator_rows_in_any_order_and_partial_rows() -> None:
    rng = np.random.default_rng(3)
    scores = tied_scores(rng, 9, 700)
    acc = TopKAccumulator(9, 4)
    for l0 in (600, 0, 300):  # label chunks out of order, rows in two uneven blocks
        acc.update(scores[5:, l0 : l0 + 300], slice(5, 9), l0)
        acc.update(scores[:5, l0 : l0 + 300], slice(0, 5), l0)
    assert_same(acc.result(), reference(scores, 4))
    # Rows never updated stay padded.
    empty = TopKAccumulator(2, 2)
    empty.update(np.ones((1, 3)), slice(1, 2), 10)
    assert empty.result()[1].tolist() == [[-1, -1], [10, 11]]


def test_float64_scores_compare_as_float32() -> None:
    # 1 + 1e-9 and 1 are equal in float32, so the lower id wins.
    s, ids = topk_dense(np.array([[1.0, 1.0 + 1e-9]]), 1)
    assert ids.tolist() == [[0]] and s.dtype == np.float32


def test_validation() -> None:
    acc = TopKAccumulator(4, 2)
    with pytest.raises(ValueError, match="rows"):
        acc.update(np.zeros((3, 2)), slice(0, 4), 0)
    with pytest.raises(ValueError, match="rows"):
        acc.update(np.zeros((3, 2)), slice(2, 5), 0)
    with pytest.raises(ValueError, match="label ids"):
        acc.update(np.zeros((1, 2)), slice(0, 1), 2**31 - 1)
    with pytest.raises(ValueError, match="k >= 1"):
        TopKAccumulator(3, 0)
    with pytest.raises(ValueError, match="returned shape"):
        topk_chunked(lambda a, b, c, d: np.zeros((b - a, 1)), 2, 5, 1, progress=False)


def test_chunk_shape() -> None:
    assert chunk_shape(1000, 3_000_000, 2**24) == (1000, 16777)  # all rows, labels as wide as fit
    assert chunk_shape(10**6, 3_000_000, 2**24) == (4096, 4096)  # too many rows: split them too
    assert chunk_shape(10, 100, 2**24) == (10, 100)
    assert chunk_shape(3, 10, 1) == (1, 1)


# Runs in a fresh interpreter so that ru_maxrss measures only this computation: N = 1,000 rows over
# L = 3,000,000 labels (3e9 scores, 12 GB as float32) generated tile by tile from H @ W_chunk.T.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource
    import numpy as np
    from xmc.inference.topk import topk_chunked

    N, L, D, K, CHECKED = 1000, 3_000_000, 16, 5, 3
    H = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    kept = []  # exact top K of rows 0..CHECKED-1 within each tile, for a reference at the end

    def score_fn(r0, r1, l0, l1):
        W = np.random.default_rng(l0).standard_normal((l1 - l0, D), dtype=np.float32)
        S = H[r0:r1] @ W.T
        if r0 == 0:
            part = S[:CHECKED]
            order = np.argsort(-part, axis=1, kind="stable")[:, :K]
            kept.append((np.take_along_axis(part, order, 1), order + l0))
        return S

    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the imports (torch, its libraries)
    scores, ids = topk_chunked(score_fn, N, L, K, progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib
    assert scores.shape == ids.shape == (N, K) and ids.min() >= 0 and ids.max() < L
    assert (np.diff(scores, axis=1) <= 0).all()
    cand_s = np.concatenate([s for s, _ in kept], axis=1)
    cand_i = np.concatenate([i for _, i in kept], axis=1)
    for r in range(CHECKED):
        order = np.lexsort((cand_i[r], -cand_s[r]))[:K]
        assert ids[r].tolist() == cand_i[r, order].tolist(), (ids[r], cand_i[r, order])
        assert scores[r].tolist() == cand_s[r, order].tolist()
    print(peak_kib)
    """
)


@pytest.mark.slow
def test_memory_of_topk_over_3m_labels() -> None:
    # Two BLAS threads, as on the 2-core CI machine: per-thread buffers would otherwise grow with the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak resident memory {peak_kib / 1024:.0f} MiB above the imports"
