"""Scoring a split: its top-k predictions (:mod:`xmc.inference.predict`), then the XMC metrics."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from xmc.inference.predict import predict_rows
from xmc.metrics import evaluate


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
