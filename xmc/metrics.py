"""Ranking metrics for extreme multi-label classification, with the Extreme Classification Repository's
(pyxclib) conventions, computed without a Python loop over rows.

Every metric is averaged over all N rows, and a row without true labels scores 0. With hits h_j at
the 1-based rank j, |y| true labels in the row and k ranks evaluated::

    P@k      = sum_{j<=k} h_j / k
    nDCG@k   = sum_{j<=k} h_j / log2(j + 1)  /  sum_{j<=min(k, |y|)} 1 / log2(j + 1)
    R@k      = sum_{j<=k} h_j / max(|y|, 1)
    RP@k     = sum_{j<=k} h_j / min(k, |y|)
    PSP@k    = sum_rows sum_{j<=k} h_j w(l_j)  /  sum_rows (the best k weights among the row's labels)
    PSnDCG@k = mean_rows(weighted DCG / unweighted ideal DCG) / the same mean for the best ordering

where w are inverse propensities (:func:`inv_propensity`). PSP@k and PSnDCG@k are ratios of
dataset totals, not means of per-row ratios. Values are fractions in [0, 1].

Hits are found by encoding each (row, label) pair as the int64 key ``row * L + label``: the true
pairs form a sorted key array and each prediction is looked up with ``np.searchsorted``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

PROPENSITY_PRESETS: dict[str, tuple[float, float]] = {
    "wikipedia": (0.5, 0.4),
    "amazon": (0.6, 2.6),
    "other": (0.55, 1.5),
}
"""``(A, B)`` of :func:`inv_propensity` for the repository's dataset families."""

# Exclusion looks at (rows x width) predictions at a time; this bounds its int64 temporaries to ~32 MiB.
_BLOCK_ELEMENTS = 1 << 22


def inv_propensity(Y_train: sp.spmatrix | sp.sparray, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Inverse label propensities ``1 + C * (n_l + B) ** -A`` with ``C = (ln N - 1) * (B + 1) ** A``.

    ``Y_train`` is a sparse ``(N, L)`` matrix whose nonzeros are the training labels; ``n_l`` is the
    number of rows carrying label ``l`` (a repeated entry counts once). Returns float64 ``(L,)``;
    labels without training rows get the largest weight, ``1 + C * B ** -A``.
    """
    num_rows = Y_train.shape[0]
    if num_rows < 1:
        raise ValueError("inv_propensity needs at least one training row")
    counts = label_frequencies(Y_train).astype(np.float64)
    C = (np.log(num_rows) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * (counts + B) ** -A


def evaluate(
    Y_true: sp.spmatrix | sp.sparray,
    topk: np.ndarray,
    inv_prop: np.ndarray | None = None,
    ks: Sequence[int] = (1, 3, 5),
    exclude: sp.spmatrix | sp.sparray | None = None,
) -> dict[str, float]:
    """Precision, nDCG, recall and R-precision at each k; propensity-scored variants given ``inv_prop``.

    Args:
        Y_true: sparse ``(N, L)``; its nonzeros are the true labels.
        topk: integer ``(N, w)`` with ``w >= max(ks)``: predicted label ids in rank order, ``-1`` for
            "no prediction". A row must not repeat a true label (a repeat raises ``ValueError``).
        inv_prop: float ``(L,)`` inverse propensities (:func:`inv_propensity`), or ``None``.
        ks: the ranks to evaluate.
        exclude: sparse ``(N, L)`` of (row, label) pairs to ignore, e.g. an LF dataset's
            ``filter_labels``: they are removed from the predictions first (later predictions move
            up, ``-1`` fills the end) and from the truth.

    Returns:
        ``{"P@k", "nDCG@k", "R@k", "RP@k"}`` for every k, plus ``"PSP@k"`` and ``"PSnDCG@k"`` when
        ``inv_prop`` is given, as Python floats in [0, 1]. All are 0 when ``N == 0``.
    """
    ranked = _rank(Y_true, topk, ks, exclude)
    num_rows, kmax = ranked.hit.shape
    scored = inv_prop is not None
    if scored:
        inv_prop = np.asarray(inv_prop, dtype=np.float64)
        if inv_prop.shape != (ranked.num_labels,):
            raise ValueError(f"inv_prop has shape {inv_prop.shape}; expected ({ranked.num_labels},)")
        best_rows, best_rank, best_weight = _best_weights(ranked, inv_prop, kmax)
    discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))  # d_j = 1 / log2(j + 1)
    cum_discount = np.cumsum(discount)
    k_values = np.array(ranked.ks)
    columns = k_values - 1

    # Every metric is a sum over rows (divided by N or by another such sum at the end), so rows are
    # processed in blocks: (rows x kmax) float64 temporaries stay small for any N.
    sums: dict[str, np.ndarray] = {}

    def add(name: str, per_row_at_k: np.ndarray) -> None:  # (b, len(ks)) -> running sums (len(ks),)
        sums[name] = sums.get(name, 0.0) + per_row_at_k.sum(axis=0)

    block = max(1, _BLOCK_ELEMENTS // kmax)
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        hit = ranked.hit[start:stop].astype(np.float64)
        counts = ranked.counts[start:stop, None]
        depth = np.minimum(counts, k_values)  # min(k, |y|), (b, len(ks))
        ideal_dcg = np.where(depth > 0, cum_discount[np.maximum(depth - 1, 0)], 1.0)  # 1: DCG is 0 anyway
        hits = np.cumsum(hit, axis=1)[:, columns]
        add("P", hits / k_values)
        add("nDCG", np.cumsum(hit * discount, axis=1)[:, columns] / ideal_dcg)
        add("R", hits / np.maximum(counts, 1))
        add("RP", hits / np.maximum(depth, 1))
        if scored:
            gain = np.where(hit > 0, inv_prop[np.maximum(ranked.pred[start:stop], 0)], 0.0)
            best = np.zeros_like(hit)  # each row's true-label weights, heaviest first
            lo, hi = np.searchsorted(best_rows, [start, stop])
            best[best_rows[lo:hi] - start, best_rank[lo:hi]] = best_weight[lo:hi]
            add("PSP_num", np.cumsum(gain, axis=1)[:, columns])
            add("PSP_den", np.cumsum(best, axis=1)[:, columns])
            add("PSnDCG_num", np.cumsum(gain * discount, axis=1)[:, columns] / ideal_dcg)
            add("PSnDCG_den", np.cumsum(best * discount, axis=1)[:, columns] / ideal_dcg)

    results: dict[str, float] = {}
    for family in ("P", "nDCG", "R", "RP") + (("PSP", "PSnDCG") if scored else ()):
        for i, k in enumerate(ranked.ks):
            if family in ("PSP", "PSnDCG"):  # ratios of dataset totals, not means of row ratios
                value = _ratio(sums[f"{family}_num"][i], sums[f"{family}_den"][i]) if num_rows else 0.0
            else:
                value = float(sums[family][i] / num_rows) if num_rows else 0.0
            results[f"{family}@{k}"] = value
    return results


def coverage(
    Y_true: sp.spmatrix | sp.sparray,
    topk: np.ndarray,
    ks: Sequence[int] = (1, 3, 5),
    exclude: sp.spmatrix | sp.sparray | None = None,
) -> dict[str, float]:
    """``{"C@k"}``: the fraction of the distinct labels present in ``Y_true`` that are correctly
    predicted within the top k of at least one row (0 when ``Y_true`` has no labels).

    Arguments are as in :func:`evaluate`.
    """
    ranked = _rank(Y_true, topk, ks, exclude)
    present = np.count_nonzero(np.bincount(ranked.truth_labels, minlength=ranked.num_labels))
    results = {}
    for k in ranked.ks:
        hit_labels = ranked.pred[:, :k][ranked.hit[:, :k]]
        found = np.count_nonzero(np.bincount(hit_labels, minlength=ranked.num_labels))
        results[f"C@{k}"] = _ratio(found, present)
    return results


def label_buckets(Y_train: sp.spmatrix | sp.sparray, num_buckets: int = 3) -> np.ndarray:
    """Assign every label to one of ``num_buckets`` frequency groups; int64 ``(L,)``, 0 = most frequent.

    Labels are ordered by training frequency (rows with the label), descending, ties to the lower
    id. With ``S_l`` the training occurrences of all labels ordered before ``l`` and ``T`` the total,
    label ``l`` goes to bucket ``min(num_buckets - 1, floor(num_buckets * S_l / T))``: each bucket
    starts at the first label whose predecessors hold at least ``b / num_buckets`` of all
    occurrences, so the label straddling a boundary stays in the earlier bucket, and each bucket
    holds about ``T / num_buckets`` occurrences (more when a single label is that frequent). Labels
    without training rows (and all labels when ``T == 0``) fall in the last bucket.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    freq = label_frequencies(Y_train)
    order = np.argsort(-freq, kind="stable")  # stable: equal frequencies keep increasing ids
    before = np.cumsum(freq[order]) - freq[order]
    total = int(freq.sum())
    buckets = np.empty(freq.size, dtype=np.int64)
    if total == 0:
        buckets[:] = num_buckets - 1
    else:
        buckets[order] = np.minimum(num_buckets * before // total, num_buckets - 1)
    return buckets


def precision_by_frequency(
    Y_true: sp.spmatrix | sp.sparray,
    topk: np.ndarray,
    Y_train: sp.spmatrix | sp.sparray,
    ks: Sequence[int] = (1, 3, 5),
    buckets: Sequence[str] = ("head", "torso", "tail"),
    exclude: sp.spmatrix | sp.sparray | None = None,
) -> dict[str, float]:
    """P@k split by how frequent the hit label is in training: ``{"P@k/<bucket>"}``.

    Labels are grouped by :func:`label_buckets` into ``len(buckets)`` groups (named by ``buckets``,
    most frequent first), each holding about an equal share of the training label occurrences.
    ``P@k/b`` counts only the top-k hits whose label lies in group ``b``, divided by k and averaged
    over all rows, so the groups' values add up to :func:`evaluate`'s ``P@k``. ``Y_train`` must have
    ``Y_true``'s label count; other arguments are as in :func:`evaluate`.
    """
    ranked = _rank(Y_true, topk, ks, exclude)
    if Y_train.shape[1] != ranked.num_labels:
        raise ValueError(f"Y_train has {Y_train.shape[1]} labels but Y_true has {ranked.num_labels}")
    group = label_buckets(Y_train, len(buckets))
    num_rows = ranked.hit.shape[0]
    results = {}
    for k in ranked.ks:
        hit_labels = ranked.pred[:, :k][ranked.hit[:, :k]]
        per_group = np.bincount(group[hit_labels], minlength=len(buckets))
        for name, count in zip(buckets, per_group, strict=True):
            results[f"P@{k}/{name}"] = _ratio(count, k * num_rows)
    return results


_KEY = re.compile(r"(?P<family>[^@]+)@(?P<k>\d+)(?P<suffix>/.+)?")


def format_table(metrics: Mapping[str, float]) -> str:
    """Lay out ``{"P@1": 0.5, "P@5/head": 0.1, ...}`` as a table in percent, two decimals.

    Rows are metric families in order of first appearance (a ``/suffix`` makes its own row, e.g.
    ``P/head``), columns are the k values; keys without ``@k`` are listed below the table.
    """
    table: dict[str, dict[int, float]] = {}
    extra: list[tuple[str, float]] = []
    for key, value in metrics.items():
        match = _KEY.fullmatch(key)
        if match is None:
            extra.append((key, value))
        else:
            name = match["family"] + (match["suffix"] or "")
            table.setdefault(name, {})[int(match["k"])] = value
    ks = sorted({k for row in table.values() for k in row})
    width = max([len(name) for name in table] + [len(key) for key, _ in extra] + [6])
    lines = []
    if table:
        lines.append(" " * width + "".join(f"{'@' + str(k):>9}" for k in ks))
        for name, row in table.items():
            cells = "".join(f"{100 * row[k]:9.2f}" if k in row else f"{'-':>9}" for k in ks)
            lines.append(f"{name:<{width}}{cells}")
    lines.extend(f"{key:<{width}}{100 * value:9.2f}" for key, value in extra)
    return "\n".join(lines)


@dataclass
class _Ranked:
    """Predictions and truth after validation and exclusion, shared by the metric functions."""

    ks: tuple[int, ...]
    num_labels: int
    pred: np.ndarray  # integer (N, kmax): predicted ids after exclusion, -1 = none
    hit: np.ndarray  # bool (N, kmax): pred is a true label of its row
    counts: np.ndarray  # int64 (N,): true labels per row
    truth_rows: np.ndarray  # int64 (nnz,): row of each true pair, ascending
    truth_labels: np.ndarray  # int64 (nnz,): label of each true pair, ascending within a row


def _rank(
    Y_true: sp.spmatrix | sp.sparray,
    topk: np.ndarray,
    ks: Sequence[int],
    exclude: sp.spmatrix | sp.sparray | None,
) -> _Ranked:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive ranks, got {ks}")
    kmax = max(ks)
    topk = np.asarray(topk)
    num_rows, num_labels = Y_true.shape
    if topk.ndim != 2 or topk.shape[0] != num_rows:
        raise ValueError(f"topk has shape {topk.shape}; expected ({num_rows}, w) to match Y_true")
    if not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk must hold integer label ids, got dtype {topk.dtype}")
    if topk.shape[1] < kmax:
        raise ValueError(f"topk holds {topk.shape[1]} predictions per row but k={kmax} was asked for")
    if topk.size and (topk.min() < -1 or topk.max() >= num_labels):
        raise ValueError(
            f"topk holds label ids in [{topk.min()}, {topk.max()}]; valid are 0..{num_labels - 1} and -1"
        )
    truth = _pair_keys(Y_true)
    if exclude is not None:
        if exclude.shape != Y_true.shape:
            raise ValueError(f"exclude has shape {exclude.shape}; expected {Y_true.shape}")
        excluded = _pair_keys(exclude)
        truth = truth[~_member(truth, excluded)]
        pred = _drop_excluded(topk, excluded, num_labels, kmax)
    else:
        pred = topk[:, :kmax]
    # Blocks of rows bound the int64 keys' memory; rows (not columns) keep the reads contiguous.
    hit = np.zeros(pred.shape, dtype=bool)
    repeats = np.zeros(truth.size, dtype=np.int64)
    block = max(1, _BLOCK_ELEMENTS // kmax)
    for start in range(0, num_rows if truth.size else 0, block):
        part = pred[start : start + block]
        rows = np.arange(start, start + part.shape[0], dtype=np.int64)[:, None] * num_labels
        keys = np.where(part >= 0, rows + part, -1)
        where = np.minimum(np.searchsorted(truth, keys), truth.size - 1)
        found = truth[where] == keys  # keys of -1 (no prediction) never match: true keys are >= 0
        hit[start : start + block] = found
        repeats += np.bincount(where[found], minlength=truth.size)
    if repeats.size and repeats.max() > 1:
        key = truth[np.argmax(repeats)]
        raise ValueError(f"topk row {key // num_labels} lists true label {key % num_labels} twice")
    # (np.divmod is several times slower than // and % on int64 arrays)
    truth_rows, truth_labels = (truth // num_labels, truth % num_labels) if num_labels else (truth, truth)
    counts = np.bincount(truth_rows, minlength=num_rows)
    return _Ranked(ks, num_labels, pred, hit, counts, truth_rows, truth_labels)


def _pair_keys(M: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Sorted unique int64 keys ``row * L + label`` of the nonzeros of a sparse ``(N, L)`` matrix."""
    M = sp.csr_matrix(M)
    rows = np.repeat(np.arange(M.shape[0], dtype=np.int64), np.diff(M.indptr))
    keys = (rows * M.shape[1] + M.indices)[M.data != 0]
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):  # CSR with unsorted or repeated indices
        keys = np.unique(keys)
    return keys


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask, shaped like ``keys``: which entries occur in ``sorted_keys``."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    where = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[where] == keys


def _drop_excluded(topk: np.ndarray, excluded: np.ndarray, num_labels: int, kmax: int) -> np.ndarray:
    """Remove excluded (row, label) pairs from ``topk`` and return the first ``kmax`` survivors of each
    row, ``(N, kmax)`` of ``topk``'s dtype, ``-1`` padded."""
    num_rows = topk.shape[0]
    per_row = np.bincount(excluded // max(num_labels, 1), minlength=num_rows)
    # A row's first kmax survivors lie within its first kmax + (its excluded count) predictions.
    width = min(topk.shape[1], kmax + int(per_row.max(initial=0)))
    out = np.full((num_rows, kmax), -1, dtype=topk.dtype)
    block = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, num_rows, block):  # blocks of rows bound the temporaries
        cand = topk[start : start + block, :width].astype(np.int64)
        rows = np.arange(start, start + cand.shape[0], dtype=np.int64)[:, None]
        dropped = _member(rows * num_labels + cand, excluded) & (cand >= 0)
        # A survivor's new rank is its column minus the number of dropped entries before it.
        new_rank = np.arange(width) - np.cumsum(dropped, axis=1)
        flat = np.flatnonzero(~dropped & (new_rank < kmax))  # much faster than a 2-D np.nonzero
        r, c = flat // width, flat % width
        out[start + r, new_rank[r, c]] = cand[r, c]
    return out


def _best_weights(ranked: _Ranked, inv_prop: np.ndarray, kmax: int) -> tuple[np.ndarray, ...]:
    """Each row's true-label weights in descending order, as triplets ``(row, rank, weight)`` (int64,
    int64, float64; rank 0 = heaviest) for the ranks below ``kmax``."""
    num_labels = ranked.num_labels
    by_weight = np.argsort(-inv_prop, kind="stable")  # labels from the heaviest down
    position = np.empty(num_labels, dtype=np.int64)
    position[by_weight] = np.arange(num_labels)
    # One int64 sort of row * L + (weight position) orders each row's labels by descending weight,
    # several times faster than a two-key lexsort.
    rows = ranked.truth_rows
    keys = np.sort(rows * num_labels + position[ranked.truth_labels])
    positions = keys - rows * num_labels  # sorting permutes only within rows, so rows stay put
    starts = np.concatenate(([0], np.cumsum(ranked.counts)[:-1]))
    rank = np.arange(rows.size) - starts[rows]
    keep = rank < kmax
    return rows[keep], rank[keep], inv_prop[by_weight[positions[keep]]]


def label_frequencies(Y: sp.spmatrix | sp.sparray) -> np.ndarray:
    """int64 ``(L,)``: number of rows of ``Y`` with a nonzero in each column."""
    keys = _pair_keys(Y)
    return np.bincount(keys % max(Y.shape[1], 1), minlength=Y.shape[1]).astype(np.int64)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0
