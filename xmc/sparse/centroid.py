"""Data-informed initial ids for a fixed fan-in classifier over fixed input features.

A label's K random ids rarely meet the ~100 nonzeros of a sparse TF-IDF row among 20,000 features, so
over raw bag-of-words features almost every logit starts as the bias alone and random (SET) regrowth
cannot find informative features (measured on CiteULike-t: dev P@1 at the most-frequent-labels
level). ``classifier.ids=centroid`` starts each label at the K input coordinates of largest magnitude
in the sum of its training documents' input rows (the label centroid of PIFA, positive-instance
feature aggregation). For TF-IDF rows those are the words most typical of the label's documents.

Labels whose centroid has fewer than K nonzeros (few or no training documents) fill their remaining
slots with the layer's usual hashed random ids, distinct within the row (``classifier.centroid_fill=
random``), or with the inputs of largest total magnitude over all training documents that the row lacks
(``frequent``): most terms of a large vocabulary are rare, so a random slot seldom sees a nonzero input
and seldom learns, while a frequent term occurs in many documents and can learn evidence for or against
the label (a hypothesis: the default stays ``random`` until measured). ``related`` first gives those
slots the inputs heaviest in the documents of the labels that co-occur with the label most often
(its most likely confusions) and that its own documents never contain, evidence against the label
where it is most needed, then fills what is left as ``frequent`` does. Only the ids change; weights
keep their initialization.

The inputs must be what the classifier sees during training: the TF-IDF vector itself
(``encoder.type=bow``, ``encoder.dim=0``) or precomputed embeddings (``encoder.type=features``), since a
learned encoder would move the coordinates under the ids.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from xmc.sparse.ids import INIT_IDS, fill_distinct

# Entries of a dense (labels x width) centroid block computed at a time: 64 MiB of float32.
_BLOCK_ELEMENTS = 1 << 24
# ``related`` fill: how many of a label's most co-occurring labels lend it their documents' inputs.
RELATED_LABELS = 16
FILLS = ("random", "frequent", "related")


def centroid_ids(X: sp.spmatrix | np.ndarray, Y: sp.spmatrix, fan_in: int) -> np.ndarray:
    """The ``fan_in`` coordinates of largest |Y^T X| per label.

    Args:
        X: (N, D) training inputs of the classifier, scipy sparse or a dense array.
        Y: (N, L) training labels; any nonzero marks a positive.
        fan_in: K, at most D.

    Returns:
        int64 (L, K): each row's picks in increasing column order, then -1 where the label's centroid
        has fewer than K nonzeros.
    """
    num_docs, width = X.shape
    if Y.shape[0] != num_docs:
        raise ValueError(f"X has {num_docs} rows but Y has {Y.shape[0]}")
    if not 1 <= fan_in <= width:
        raise ValueError(f"fan_in must be in 1..{width}, got {fan_in}")
    Yt = sp.csr_matrix(Y, dtype=np.float32).T.tocsr()
    Yt.data[:] = 1.0
    num_labels = Yt.shape[0]
    if sp.issparse(X):
        return _sparse_top(Yt @ sp.csr_matrix(X, dtype=np.float32), fan_in)
    ids = np.full((num_labels, fan_in), -1, np.int64)
    dense = np.asarray(X, dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // width)
    for start in range(0, num_labels, step):
        sums = torch.from_numpy(np.asarray(Yt[start : start + step] @ dense, dtype=np.float32)).abs()
        top = torch.topk(sums, fan_in, dim=1)
        picked = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, width))
        picked = torch.sort(picked, dim=1).values  # real picks first, in column order
        ids[start : start + step] = torch.where(picked < width, picked, -1).numpy()
    return ids


def frequent_fill(ids: np.ndarray, X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Fill the -1 slots of :func:`centroid_ids`' output with the columns of largest total |X|.

    Each row takes, in order of decreasing column mass (ties to the lower column), the first columns
    it does not already hold. The first K columns of that order always hold enough: at most the row's
    n picks are among them, and it needs K - n.

    Args:
        ids: int64 (L, K): each row's distinct picks first, then -1 (as :func:`centroid_ids` or
            :func:`related_fill` return it).
        X: (N, D) the training inputs the picks came from.

    Returns:
        int64 (L, K) without -1, every row's ids distinct.
    """
    fan_in, width = ids.shape[1], X.shape[1]
    mass = np.asarray(abs(X).sum(axis=0) if sp.issparse(X) else np.abs(X).sum(axis=0), np.float64).ravel()
    order = np.argsort(-mass, kind="stable")[:fan_in].astype(np.int64)
    found = (ids >= 0).sum(axis=1)
    out = ids.copy()
    rows = np.flatnonzero(found < fan_in)
    step = max(1, _BLOCK_ELEMENTS // fan_in)
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        picks = np.sort(np.where(ids[block] >= 0, ids[block], width), axis=1)  # absent last
        offset = (np.arange(len(block), dtype=np.int64) * (width + 1))[:, None]
        flat = (picks + offset).ravel()  # globally sorted: rows in turn, columns in order
        wanted = order[None, :] + offset
        at = np.minimum(np.searchsorted(flat, wanted), flat.size - 1)
        free = flat[at] != wanted  # candidate columns the row does not hold yet
        rank = np.cumsum(free, axis=1) - 1
        need = (fan_in - found[block])[:, None]
        take = free & (rank < need)
        r, c = np.nonzero(take)
        out[block[r], found[block][r] + rank[r, c]] = order[c]
    return out


def related_fill(
    ids: np.ndarray, X: sp.spmatrix | np.ndarray, Y: sp.spmatrix, neighbours: int = RELATED_LABELS
) -> np.ndarray:
    """Fill -1 slots of :func:`centroid_ids`' output from the label's co-occurring labels' documents.

    A label's related labels are the ``neighbours`` labels that share the most training documents with
    it (ties to the lower label). Its free slots take, heaviest first (ties to the lower column), the
    columns of the mean document of each related label, weighted by the documents shared, that the row
    does not hold yet: as a row needs filling only when its own centroid ran out of nonzeros, these are
    inputs its own documents never contain. Slots still free after that (a label without related
    labels, or whose related labels' documents hold too few other columns) stay -1.

    Args:
        ids: int64 (L, K) as :func:`centroid_ids` returns it (picks first in column order, then -1).
        X: (N, D) the training inputs the picks came from.
        Y: (N, L) the training labels the picks came from.
        neighbours: related labels per label.

    Returns:
        int64 (L, K): each row's own picks in place, then the related ones in column order, then -1.
    """
    fan_in, width = ids.shape[1], X.shape[1]
    if Y.shape[1] != ids.shape[0] or Y.shape[0] != X.shape[0]:
        raise ValueError(f"ids cover {ids.shape[0]} labels of {X.shape[0]} documents, Y is {Y.shape}")
    found = (ids >= 0).sum(axis=1)
    rows = np.flatnonzero(found < fan_in)
    out = ids.copy()
    if rows.size == 0 or neighbours < 1:
        return out
    Yt = sp.csr_matrix(Y, dtype=np.float32).T.tocsr()
    Yt.data[:] = 1.0
    docs = np.asarray(Yt.sum(axis=1), np.float64).ravel()
    shared = (Yt[rows] @ Yt.T).tocsr()  # documents each filled label shares with every label
    at, to, weight = [], [], []  # (filled row, related label, shared documents / the label's documents)
    for i, label in enumerate(rows):
        cols = shared.indices[shared.indptr[i] : shared.indptr[i + 1]]
        counts = shared.data[shared.indptr[i] : shared.indptr[i + 1]]
        keep = cols != label
        cols, counts = cols[keep], counts[keep]
        top = np.lexsort((cols, -counts))[:neighbours]
        at.append(np.full(len(top), i))
        to.append(cols[top])
        weight.append(counts[top] / docs[cols[top]])  # shared documents x the label's mean document
    weights = sp.csr_matrix(
        (np.concatenate(weight), (np.concatenate(at), np.concatenate(to))),
        shape=(len(rows), Yt.shape[0]),
        dtype=np.float32,
    )
    sums = Yt @ (sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
    step = max(1, _BLOCK_ELEMENTS // width)
    for start in range(0, len(rows), step):
        block = weights[start : start + step] @ sums
        block = np.abs(block.toarray() if sp.issparse(block) else np.asarray(block))
        for i, label in enumerate(rows[start : start + step]):
            mass = block[i]
            held = ids[label, : found[label]]
            mass[held] = 0.0
            candidates = np.flatnonzero(mass > 0)
            need = fan_in - found[label]
            picks = candidates[np.lexsort((candidates, -mass[candidates]))[:need]]
            out[label, found[label] : found[label] + len(picks)] = np.sort(picks)
    return out


def _sparse_top(S: sp.csr_matrix, fan_in: int) -> np.ndarray:
    """Top-``fan_in`` |entries| per row of a sparse (L, D) matrix, without a Python loop over rows."""
    S.sum_duplicates()
    S.eliminate_zeros()
    lengths = np.diff(S.indptr)
    rows = np.repeat(np.arange(S.shape[0]), lengths)
    # Within each row, largest magnitude first (ties to the lower column: lexsort is stable).
    order = np.lexsort((S.indices, -np.abs(S.data), rows))
    rank = np.arange(S.nnz) - S.indptr[rows[order]]
    kept = order[rank < fan_in]
    kept_rows, kept_cols = rows[kept], S.indices[kept]
    # Column order within a row: sort the kept entries by (row, column).
    by_column = np.lexsort((kept_cols, kept_rows))
    kept_rows, kept_cols = kept_rows[by_column], kept_cols[by_column]
    found = np.minimum(lengths, fan_in).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(found)[:-1]])
    slot = np.arange(len(kept_rows)) - starts[kept_rows]
    ids = np.full((S.shape[0], fan_in), -1, np.int64)
    ids[kept_rows, slot] = kept_cols
    return ids


@torch.no_grad()
def init_centroid_ids(
    layer, X: sp.spmatrix | np.ndarray, Y: sp.spmatrix, fill: str = "random"
) -> dict[str, float]:
    """Set a :class:`~xmc.nn.FixedFanInLinear`'s ids to its labels' centroid picks (module docstring).

    ``X`` (N, D) and ``Y`` (N, L) cover the layer's whole label range (``layer.row_offset`` 0);
    ``fill``: ``random``, ``frequent`` or ``related``, what takes the slots a label's centroid cannot.
    Returns ``{"filled": share of slots not taken by the label's own centroid}``, with ``"related"``
    (the share of slots the related fill took) for ``fill="related"``.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if Y.shape[1] != layer.out_features or X.shape[1] != layer.in_features:
        raise ValueError(
            f"centroid ids need inputs of width {layer.in_features} and {layer.out_features} labels, "
            f"got {X.shape[1]} and {Y.shape[1]}"
        )
    if layer.group > 1:  # a group's ids: the centroid picks of its labels' documents together
        groups = np.arange(Y.shape[1]) // layer.group
        assign = sp.csr_matrix((np.ones(Y.shape[1], np.float32), (np.arange(Y.shape[1]), groups)))
        Y = sp.csr_matrix(Y, dtype=np.float32) @ assign
    ids = centroid_ids(X, Y, layer.fan_in)
    empty = torch.from_numpy(ids < 0)
    report = {"filled": float(empty.float().mean())}
    if fill == "related":
        related = related_fill(ids, X, Y)
        report["related"] = float((related >= 0).mean() - (ids >= 0).mean())
        drawn = torch.from_numpy(frequent_fill(related, X))
    elif fill == "frequent":
        drawn = torch.from_numpy(frequent_fill(ids, X))
    else:
        rows = layer.global_rows(0, layer.indices.shape[0]).cpu()
        drawn = fill_distinct(
            torch.from_numpy(ids).clamp(min=0), empty, rows, layer.in_features, (layer.seed, INIT_IDS)
        )
    layer.indices.copy_(drawn.to(layer.indices.dtype))
    return report
