"""Hand-computed checks of xmc.metrics (the repository's pyxclib conventions, docs/design.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from xmc.metrics import (
    PROPENSITY_PRESETS,
    coverage,
    evaluate,
    format_table,
    inv_propensity,
    label_buckets,
    precision_by_frequency,
)

# Discount of 1-based rank j: d_j = 1 / log2(j + 1).
d1, d2, d3, d4, d5 = (1 / math.log2(j + 1) for j in range(1, 6))


def csr(rows: list[list[int]], num_labels: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([label for r in rows for label in r], dtype=np.int32)
    return sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(len(rows), num_labels))


# Four rows over L = 6 labels. Row 2 has no labels; row 0 has fewer than 5 predictions (-1 padding).
#   row 0: y = {0, 2}     top = [2, 1, 0, -1, -1]  hits at ranks 1, 3
#   row 1: y = {1}        top = [1, 3, 4, 5, 0]    hit at rank 1
#   row 2: y = {}         top = [0, 1, 2, 3, 4]    no hits
#   row 3: y = {3, 4, 5}  top = [0, 5, 3, 4, 1]    hits at ranks 2, 3, 4
Y = csr([[0, 2], [1], [], [3, 4, 5]], 6)
TOP = np.array([[2, 1, 0, -1, -1], [1, 3, 4, 5, 0], [0, 1, 2, 3, 4], [0, 5, 3, 4, 1]], dtype=np.int32)
# Inverse propensities of labels 0..5 (chosen by hand so that the best ordering differs from id order).
W = np.array([2.0, 4.0, 1.0, 3.0, 5.0, 6.0])


def test_precision_recall_rprecision_by_hand() -> None:
    m = evaluate(Y, TOP)
    # P@k = mean over the 4 rows of hits/k (row 2 counts as 0).
    assert m["P@1"] == pytest.approx((1 + 1 + 0 + 0) / 1 / 4)  # 0.5
    assert m["P@3"] == pytest.approx((2 + 1 + 0 + 2) / 3 / 4)  # 5/12
    assert m["P@5"] == pytest.approx((2 + 1 + 0 + 3) / 5 / 4)  # 0.3
    # R@k = hits / max(|y|, 1) with |y| = 2, 1, 0, 3.
    assert m["R@1"] == pytest.approx((1 / 2 + 1 / 1 + 0 + 0 / 3) / 4)  # 0.375
    assert m["R@3"] == pytest.approx((2 / 2 + 1 / 1 + 0 + 2 / 3) / 4)  # 2/3
    assert m["R@5"] == pytest.approx((2 / 2 + 1 / 1 + 0 + 3 / 3) / 4)  # 0.75
    # RP@k = hits / min(k, |y|); 0 for the empty row.
    assert m["RP@1"] == pytest.approx((1 / 1 + 1 / 1 + 0 + 0 / 1) / 4)  # 0.5
    assert m["RP@3"] == pytest.approx((2 / 2 + 1 / 1 + 0 + 2 / 3) / 4)  # 2/3
    assert m["RP@5"] == pytest.approx((2 / 2 + 1 / 1 + 0 + 3 / 3) / 4)  # 0.75
    assert "PSP@1" not in m and "PSnDCG@1" not in m


def test_ndcg_by_hand() -> None:
    m = evaluate(Y, TOP)
    # nDCG@k = sum of d_j over hit ranks j <= k, divided by d_1 + ... + d_min(k, |y|).
    row0 = [d1 / d1, (d1 + d3) / (d1 + d2), (d1 + d3) / (d1 + d2)]  # |y| = 2: ideal stops at rank 2
    row1 = [1.0, 1.0, 1.0]  # hit at rank 1, |y| = 1
    row3 = [0.0, (d2 + d3) / (d1 + d2 + d3), (d2 + d3 + d4) / (d1 + d2 + d3)]  # |y| = 3
    for i, k in enumerate((1, 3, 5)):
        assert m[f"nDCG@{k}"] == pytest.approx((row0[i] + row1[i] + 0 + row3[i]) / 4)


def test_propensity_scored_by_hand() -> None:
    m = evaluate(Y, TOP, inv_prop=W)
    # Weighted hits: row 0 label 2 (w 1) at rank 1, label 0 (w 2) at rank 3; row 1 label 1 (w 4) at
    # rank 1; row 3 labels 5 (w 6), 3 (w 3), 4 (w 5) at ranks 2, 3, 4.
    # Best weights per row, descending: row 0 [2, 1], row 1 [4], row 3 [6, 5, 3].
    assert m["PSP@1"] == pytest.approx((1 + 4) / (2 + 4 + 6))  # 5/12
    assert m["PSP@3"] == pytest.approx((1 + 2 + 4 + 6 + 3) / (2 + 1 + 4 + 6 + 5 + 3))  # 16/21
    assert m["PSP@5"] == pytest.approx((1 + 2 + 4 + 6 + 3 + 5) / (2 + 1 + 4 + 6 + 5 + 3))  # 1
    # PSnDCG@k: per row, weighted DCG over the *unweighted* ideal DCG; the mean of that over the
    # same mean for each row's best weight ordering (the 1/4 of the means cancels).
    ideal0, ideal3 = d1 + d2, d1 + d2 + d3  # unweighted ideals at k >= 3 (|y| = 2 and 3)
    num1, den1 = 1 * d1 + 4 * d1, 2 * d1 + 4 * d1 + 6 * d1
    assert m["PSnDCG@1"] == pytest.approx(num1 / den1)
    num3 = (1 * d1 + 2 * d3) / ideal0 + 4 + (6 * d2 + 3 * d3) / ideal3
    den3 = (2 * d1 + 1 * d2) / ideal0 + 4 + (6 * d1 + 5 * d2 + 3 * d3) / ideal3
    assert m["PSnDCG@3"] == pytest.approx(num3 / den3)
    num5 = (1 * d1 + 2 * d3) / ideal0 + 4 + (6 * d2 + 3 * d3 + 5 * d4) / ideal3
    assert m["PSnDCG@5"] == pytest.approx(num5 / den3)
    # The unscored metrics do not change with propensities.
    plain = evaluate(Y, TOP)
    assert all(m[key] == plain[key] for key in plain)


def test_exclusion_moves_later_predictions_up_and_drops_truth() -> None:
    # L = 5. Row 0: y = {0, 1}, top = [3, 0, 4, 1, -1]; row 1: y = {2}, top = [2, 0, 1, 3, 4].
    # Excluded pairs: (0, 3) a wrong prediction, (0, 1) a true label, (1, 2) row 1's only label.
    # After exclusion: row 0: y = {0}, top = [0, 4, -1, -1, -1] (hit moves up to rank 1);
    #                  row 1: y = {},  top = [0, 1, 3, 4, -1] (no label: scores 0).
    Yx = csr([[0, 1], [2]], 5)
    top = np.array([[3, 0, 4, 1, -1], [2, 0, 1, 3, 4]])
    exclude = sp.csr_matrix((np.ones(3), ([0, 0, 1], [3, 1, 2])), shape=(2, 5))
    m = evaluate(Yx, top, inv_prop=np.ones(5), exclude=exclude)
    assert m["P@1"] == pytest.approx(1 / 2)
    assert m["P@3"] == pytest.approx(1 / 3 / 2)
    assert m["P@5"] == pytest.approx(1 / 5 / 2)
    for k in (1, 3, 5):  # row 0 is perfect for R, RP, nDCG; row 1 scores 0
        assert m[f"R@{k}"] == m[f"RP@{k}"] == m[f"nDCG@{k}"] == pytest.approx(0.5)
        assert m[f"PSP@{k}"] == m[f"PSnDCG@{k}"] == pytest.approx(1.0)  # hit/best: 1 / 1
    # Without exclusion: row 0's hits sit at ranks 2 and 4, row 1's at rank 1.
    plain = evaluate(Yx, top)
    assert plain["P@3"] == pytest.approx((1 + 1) / 3 / 2)
    assert plain["R@1"] == pytest.approx((0 / 2 + 1 / 1) / 2)


def test_exclusion_with_many_pairs_in_one_row() -> None:
    # More excluded pairs in a row than k: all of row 0's first four predictions go, the 5th moves to 1.
    Yx = csr([[7], [1]], 8)
    top = np.array([[0, 1, 2, 3, 7, 5], [1, 2, 3, 4, 5, 6]])
    exclude = sp.csr_matrix((np.ones(4), ([0, 0, 0, 0], [0, 1, 2, 3])), shape=(2, 8))
    m = evaluate(Yx, top, ks=(1,), exclude=exclude)
    assert m["P@1"] == 1.0


def test_rows_without_any_labels_score_zero() -> None:
    m = evaluate(csr([[], []], 3), np.array([[0, 1, 2], [2, 1, -1]]), inv_prop=np.ones(3), ks=(1, 3))
    assert all(value == 0.0 for value in m.values())
    assert coverage(csr([[], []], 3), np.array([[0], [1]]), ks=(1,)) == {"C@1": 0.0}
    # No rows at all: zeros, not NaN.
    assert set(evaluate(csr([], 3), np.zeros((0, 5), np.int32), inv_prop=np.ones(3)).values()) == {0.0}


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="k=5"):
        evaluate(Y, TOP[:, :3])
    with pytest.raises(ValueError, match="label ids"):
        evaluate(Y, np.where(TOP == 5, 6, TOP))  # id 6 >= L
    with pytest.raises(ValueError, match="label ids"):
        evaluate(Y, np.where(TOP == 5, -2, TOP))
    with pytest.raises(ValueError, match="integer"):
        evaluate(Y, TOP.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        evaluate(Y, TOP[:3])
    with pytest.raises(ValueError, match="inv_prop"):
        evaluate(Y, TOP, inv_prop=np.ones(5))
    with pytest.raises(ValueError, match="row 1 lists true label 1 twice"):
        evaluate(Y, np.array([[2, 1, 0, -1, -1], [1, 3, 1, 5, 0], [0] * 5, [0] * 5]))


def test_csr_with_unsorted_duplicate_and_zero_entries() -> None:
    # Row 0 stores label 2 twice and out of order, plus an explicit zero at label 1 (not a label).
    messy = sp.csr_matrix(
        (np.array([1.0, 1.0, 1.0, 0.0]), np.array([2, 0, 2, 1]), np.array([0, 4])), shape=(1, 3)
    )
    m = evaluate(messy, np.array([[1, 2, 0]]), ks=(1, 3))
    assert m["P@1"] == 0.0 and m["P@3"] == pytest.approx(2 / 3) and m["R@3"] == 1.0


def test_inv_propensity_against_the_formula() -> None:
    # N = 6 training rows; label counts n = [6, 3, 3, 2, 1, 0].
    Y_train = csr([[0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 2], [0, 2], [0, 2]], 6)
    # With A = 1, B = 1: C = (ln 6 - 1) * 2 and w = 1 + C / (n + 1), so n = 1 gives ln 6 exactly.
    w = inv_propensity(Y_train, A=1.0, B=1.0)
    assert w[4] == pytest.approx(math.log(6))
    assert w[5] == pytest.approx(2 * math.log(6) - 1)  # n = 0: 1 + C
    assert w[1] == pytest.approx(1 + (math.log(6) - 1) * 2 / 4)
    # Default A, B against the formula, every label.
    C = (math.log(6) - 1) * 2.5**0.55
    expected = [1 + C * (n + 1.5) ** -0.55 for n in (6, 3, 3, 2, 1, 0)]
    assert inv_propensity(Y_train) == pytest.approx(expected)
    assert inv_propensity(Y_train).dtype == np.float64
    assert PROPENSITY_PRESETS == {"wikipedia": (0.5, 0.4), "amazon": (0.6, 2.6), "other": (0.55, 1.5)}
    # A repeated entry counts once.
    doubled = sp.csr_matrix((np.ones(2), np.array([0, 0]), np.array([0, 2, 2])), shape=(2, 1))
    assert inv_propensity(doubled, 1.0, 1.0)[0] == pytest.approx(1 + (math.log(2) - 1) * 2 / 2)


def test_coverage_by_hand() -> None:
    # Labels present in Y: {0, ..., 5}. Correct top-1: {2 (row 0), 1 (row 1)};
    # top-3 adds 0 (row 0), 5, 3 (row 3); top-5 adds 4 (row 3).
    assert coverage(Y, TOP) == pytest.approx({"C@1": 2 / 6, "C@3": 5 / 6, "C@5": 6 / 6})


# Training counts n = [6, 3, 3, 2, 1, 0] (T = 15), as in the inv_propensity test.
Y_TRAIN = csr([[0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 2], [0, 2], [0, 2]], 6)


def test_label_buckets() -> None:
    # Sorted: 0 (6), 1 (3), 2 (3), 3 (2), 4 (1), 5 (0); occurrences before each: 0, 6, 9, 12, 14, 15.
    # Bucket = min(2, 3 * before // 15): 0, 1, 1, 2, 2, 2 (label 0 alone holds 40%).
    assert label_buckets(Y_TRAIN).tolist() == [0, 1, 1, 2, 2, 2]
    # Ties go to the lower id: counts [1, 3, 1, 1] sort as 1, 0, 2, 3 with before = 0, 3, 4, 5 (T = 6).
    ties = csr([[0, 1], [1, 2], [1, 3]], 4)
    assert label_buckets(ties).tolist() == [1, 0, 2, 2]
    assert label_buckets(csr([[], []], 3)).tolist() == [2, 2, 2]  # no training labels: all tail


def test_precision_by_frequency_by_hand_and_sums_to_precision() -> None:
    # Buckets: head {0}, torso {1, 2}, tail {3, 4, 5}. Hits: row 0 label 2 (torso, rank 1) and label 0
    # (head, rank 3); row 1 label 1 (torso, rank 1); row 3 labels 5, 3, 4 (tail, ranks 2-4).
    m = precision_by_frequency(Y, TOP, Y_TRAIN)
    expected = {
        "P@1/head": 0 / 4, "P@1/torso": 2 / 4, "P@1/tail": 0 / 4,
        "P@3/head": 1 / 12, "P@3/torso": 2 / 12, "P@3/tail": 2 / 12,
        "P@5/head": 1 / 20, "P@5/torso": 2 / 20, "P@5/tail": 3 / 20,
    }  # fmt: skip
    assert m == pytest.approx(expected)
    # The identity on random data: the buckets' shares add up to P@k.
    rng = np.random.default_rng(0)
    Yr = sp.random(200, 50, density=0.06, format="csr", random_state=1)
    top = np.argsort(rng.random((200, 50)), axis=1)[:, :10]
    Y_train = sp.random(300, 50, density=0.1, format="csr", random_state=2)
    parts = precision_by_frequency(Yr, top, Y_train, ks=(1, 3, 10))
    total = evaluate(Yr, top, ks=(1, 3, 10))
    for k in (1, 3, 10):
        assert total[f"P@{k}"] > 0
        assert sum(parts[f"P@{k}/{b}"] for b in ("head", "torso", "tail")) == pytest.approx(total[f"P@{k}"])


def test_format_table() -> None:
    text = format_table({"P@1": 0.5, "P@3": 0.41666, "nDCG@1": 0.25, "P@1/head": 0.125, "loss": 0.01})
    lines = text.splitlines()
    assert lines[0].split() == ["@1", "@3"]
    assert lines[1].split() == ["P", "50.00", "41.67"]
    assert lines[2].split() == ["nDCG", "25.00", "-"]
    assert lines[3].split() == ["P/head", "12.50", "-"]
    assert lines[4].split() == ["loss", "1.00"]
    assert len(lines[0]) == len(lines[1]) == len(lines[2]) == len(lines[3])  # aligned columns


def loop_reference(Y: sp.csr_matrix, top: np.ndarray, w: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """The definitions of docs/design.md (and xmc/metrics.py) written row by row, as plainly as possible."""
    n = Y.shape[0]
    sums: dict[str, float] = {}
    for r in range(n):
        truth = set(Y.indices[Y.indptr[r] : Y.indptr[r + 1]].tolist())
        best = sorted((w[label] for label in truth), reverse=True)
        for k in ks:
            h = [1.0 if label in truth else 0.0 for label in top[r, :k]]
            gains = [w[label] if hit else 0.0 for label, hit in zip(top[r, :k], h, strict=True)]
            disc = [1 / math.log2(j + 2) for j in range(k)]
            ideal = sum(disc[: min(k, len(truth))]) or 1.0
            parts = {
                "P": sum(h) / k,
                "nDCG": sum(a * b for a, b in zip(h, disc, strict=True)) / ideal,
                "R": sum(h) / max(len(truth), 1),
                "RP": sum(h) / max(min(k, len(truth)), 1),
                "PSP_num": sum(gains),
                "PSP_den": sum(best[:k]),
                "PSnDCG_num": sum(a * b for a, b in zip(gains, disc, strict=True)) / ideal,
                "PSnDCG_den": sum(a * b for a, b in zip(best[:k], disc, strict=False)) / ideal,
            }
            for name, value in parts.items():
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + value
    out = {}
    for k in ks:
        for name in ("P", "nDCG", "R", "RP"):
            out[f"{name}@{k}"] = sums[f"{name}@{k}"] / n
        for name in ("PSP", "PSnDCG"):
            out[f"{name}@{k}"] = sums[f"{name}_num@{k}"] / sums[f"{name}_den@{k}"]
    return out


def test_random_data_matches_a_row_by_row_reference() -> None:
    rng = np.random.default_rng(5)
    n, num_labels = 300, 40
    Yr = sp.csr_matrix(rng.random((n, num_labels)) < 0.08, dtype=np.float32)
    top = np.argsort(rng.random((n, num_labels)) - 0.5 * Yr.toarray(), axis=1)[:, :12]  # hits likely
    top[rng.random(top.shape) < 0.1] = -1  # scattered "no prediction" slots
    w = rng.uniform(1, 5, num_labels)
    ks = (1, 2, 5, 12)
    got = evaluate(Yr, top, w, ks=ks)
    want = loop_reference(Yr, top, np.append(w, 0.0), ks)  # w[-1] is never used: -1 is never a hit
    assert got == pytest.approx(want)
    assert 0.1 < got["P@1"] < 0.9  # the case is not degenerate
    # Exclusion equals removing the pairs by hand: from the truth, and from each row's list.
    exclude = sp.csr_matrix(rng.random((n, num_labels)) < 0.1, dtype=np.float32)
    Y_kept = (Yr - Yr.multiply(exclude)).tocsr()
    Y_kept.eliminate_zeros()
    top_kept = np.full_like(top, -1)
    for r in range(n):
        dropped = set(exclude.indices[exclude.indptr[r] : exclude.indptr[r + 1]].tolist())
        kept = [label for label in top[r] if label < 0 or label not in dropped]
        top_kept[r, : len(kept)] = kept
    assert evaluate(Yr, top, w, ks=ks, exclude=exclude) == pytest.approx(evaluate(Y_kept, top_kept, w, ks=ks))


def test_row_blocks_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large inputs are processed in blocks of rows; tiny blocks (uneven: 7 elements) must agree.
    rng = np.random.default_rng(9)
    Yr = sp.csr_matrix(rng.random((50, 30)) < 0.1, dtype=np.float32)
    top = np.argsort(rng.random((50, 30)) - 0.5 * Yr.toarray(), axis=1)[:, :8]
    exclude = sp.csr_matrix(rng.random((50, 30)) < 0.1, dtype=np.float32)
    w = rng.uniform(1, 5, 30)
    whole = evaluate(Yr, top, w, ks=(1, 4, 6), exclude=exclude)
    monkeypatch.setattr("xmc.metrics._BLOCK_ELEMENTS", 7)
    assert evaluate(Yr, top, w, ks=(1, 4, 6), exclude=exclude) == pytest.approx(whole)
