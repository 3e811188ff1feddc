"""Dataset statistics for ``xmc data info``: sizes, label frequencies, labels per point."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _spread(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def summarize(Y: sp.csr_matrix, X: sp.csr_matrix | None = None, Y_train: sp.csr_matrix | None = None) -> dict:
    """Statistics of a split: ``Y`` (N, L) labels, ``X`` (N, F) features when the format has them,
    and, given the training labels ``Y_train``, the labels of ``Y`` that have no training point."""
    Y = sp.csr_matrix(Y)
    per_point = np.diff(Y.indptr)
    per_label = np.bincount(Y.indices, minlength=Y.shape[1])
    info: dict = {
        "points": int(Y.shape[0]),
        "labels": int(Y.shape[1]),
        "label_nonzeros": int(Y.nnz),
        "labels_per_point": _spread(per_point),
        "points_without_labels": int(np.count_nonzero(per_point == 0)),
        "points_per_label": _spread(per_label),
        "labels_without_points": int(np.count_nonzero(per_label == 0)),
        "labels_with_one_point": int(np.count_nonzero(per_label == 1)),
        # Share of all label occurrences held by the most frequent 1% of labels: how skewed the tail is.
        "top_1pct_label_share": _top_share(per_label, 0.01),
    }
    if X is not None:
        per_row = np.diff(sp.csr_matrix(X).indptr)
        info["features"] = int(X.shape[1])
        info["feature_nonzeros_per_point"] = _spread(per_row)
        info["points_without_features"] = int(np.count_nonzero(per_row == 0))
    if Y_train is not None:
        if Y_train.shape[1] != Y.shape[1]:
            raise ValueError(f"the training file has {Y_train.shape[1]} labels, this one {Y.shape[1]}")
        in_train = np.bincount(sp.csr_matrix(Y_train).indices, minlength=Y.shape[1]) > 0
        unseen = ~in_train
        info["labels_without_training_points"] = int(np.count_nonzero(unseen))
        info["positives_on_labels_without_training_points"] = int(per_label[unseen].sum())
    return info


def _top_share(per_label: np.ndarray, fraction: float) -> float:
    total = per_label.sum()
    if total == 0:
        return 0.0
    top = max(1, int(round(fraction * len(per_label))))
    return float(np.sort(per_label)[::-1][:top].sum() / total)


def format_summary(info: dict) -> str:
    """Human-readable lines for :func:`summarize`'s output."""

    def spread(name: str) -> str:
        s = info[name]
        return f"mean {s['mean']:.2f}, median {s['median']:g}, min {s['min']:g}, max {s['max']:g}"

    lines = [f"points: {info['points']:,}   labels: {info['labels']:,}"]
    if "features" in info:
        lines[0] += f"   features: {info['features']:,}"
        lines.append(
            f"features per point: {spread('feature_nonzeros_per_point')}; "
            f"points without features: {info['points_without_features']:,}"
        )
    lines += [
        f"labels per point: {spread('labels_per_point')}; "
        f"points without labels: {info['points_without_labels']:,}",
        f"points per label: {spread('points_per_label')}",
        f"labels without points: {info['labels_without_points']:,}; with one point: "
        f"{info['labels_with_one_point']:,}; top 1% of labels hold {100 * info['top_1pct_label_share']:.1f}% "
        "of label occurrences",
    ]
    if "labels_without_training_points" in info:
        lines.append(
            f"labels without training points: {info['labels_without_training_points']:,} "
            f"({info['positives_on_labels_without_training_points']:,} positives here fall on them)"
        )
    return "\n".join(lines)
