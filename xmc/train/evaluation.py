"""Scoring a split: top-k predictions over all labels in bounded memory, then the XMC metrics."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from xmc.metrics import evaluate


@torch.no_grad()
def predict_rows(
    model,
    source,
    rows: np.ndarray,
    device: torch.device,
    precision: str,
    batch_size: int,
    k: int,
    parallel=None,
):
    """``(scores float32 (len(rows), k), ids int32 (len(rows), k))`` of documents ``rows`` of the inputs
    ``source``, best first, in eval mode and batches of ``batch_size``. Over several ranks
    (``parallel``, a :class:`~xmc.train.parallel.Parallel`) every rank takes part and gets the whole."""
    from xmc.train.loop import autocast

    if parallel is not None and parallel.active:
        return parallel.predict_rows(model, source, rows, device, precision, batch_size, k)

    model.eval()
    scores = np.empty((len(rows), k), np.float32)
    ids = np.empty((len(rows), k), np.int32)
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        batch = {key: v.to(device, non_blocking=True) for key, v in source.batch(part).items()}
        with autocast(device, precision):
            h = model.represent(batch)
        top_scores, top_ids = model.classifier.topk(h.float(), k)
        scores[start : start + len(part)] = top_scores.cpu().numpy()
        ids[start : start + len(part)] = top_ids.cpu().numpy()
    return scores, ids


def predict_split(
    model, split, inputs, device: torch.device, precision: str, batch_size: int, k: int, parallel=None
):
    """Top-k of ``split``'s rows (see :func:`predict_rows`)."""
    return predict_rows(model, inputs[split.source], split.rows, device, precision, batch_size, k, parallel)


def evaluate_split(
    model, split, inputs, device, precision, batch_size, inv_prop=None, k: int = 5, parallel=None
) -> dict:
    """P@k, nDCG@k, R@k, RP@k (and PSP@k, PSnDCG@k given propensities) for k = 1, 3, 5."""
    width = k + (0 if split.exclude is None else int(np.diff(split.exclude.indptr).max(initial=0)))
    _, ids = predict_split(model, split, inputs, device, precision, batch_size, width, parallel)
    return evaluate(split.Y, ids, inv_prop=inv_prop, exclude=split.exclude)


def most_frequent_topk(Y_train: sp.csr_matrix, num_rows: int, k: int) -> np.ndarray:
    """The baseline every table prints beside the model: the k most frequent training labels for
    every document (ties to the lower id)."""
    counts = np.bincount(Y_train.indices, minlength=Y_train.shape[1])
    top = np.argsort(-counts, kind="stable")[:k].astype(np.int32)
    return np.tile(top, (num_rows, 1))
