"""Label clusters for the auxiliary meta-classifier: label representations and balanced 2-means.

Label representations are PIFA-style (positive-instance feature aggregation): a label's vector is the
mean of its training documents' L2-normalized feature rows, L2-normalized again, so cosine similarity
between labels reflects the documents they share in feature space. A label without training documents
gets a zero vector (it still receives a cluster).

Width reduction. Sparse bag-of-words features are millions wide and a label's mean keeps the union of
its documents' nonzeros, so ``Y^T X`` can hold far more nonzeros than X itself. When the input width
exceeds ``max_dim`` (default 256) the normalized rows are first multiplied by a seeded sparse
Johnson-Lindenstrauss matrix R (F, max_dim): every input feature lands in ``SKETCH_NNZ`` = 8 output
coordinates, one in each of 8 blocks of ``max_dim / 8``, with random signs and value ``1/sqrt(8)``
(the block construction of Kane and Nelson). R has 8 F nonzeros instead of F * max_dim entries; it
preserves inner products of unit vectors to about ``1/sqrt(max_dim)`` (0.06 at 256), plenty for
clustering. Documents are processed in chunks and their projected rows added into the (L, max_dim)
output in place, so memory stays O(L * max_dim + chunk) whatever N and F.

Balanced clustering (``balanced_clusters``) is hierarchical spherical 2-means: each tree node is split
in two by 2-means on cosine similarity, and the split is cut at a fixed size by sorting the node's
labels on ``cos(x, c0) - cos(x, c1) = x . (c0 - c1)``. For ``K`` clusters over ``L`` labels, leaf ``j``
owns positions ``[j L // K, (j + 1) L // K)`` of the final label order, and a node covering leaves
``[j0, j1)`` is cut at leaf ``(j0 + j1) // 2``. Every cluster therefore has ``L // K`` or
``L // K + 1`` labels (max - min <= 1) for any K, power of two or not, in ``ceil(log2 K)`` levels.
All nodes of a level run together as one padded (nodes, size, d) batch: each 2-means iteration is two
batched matrix-vector products and one batched sort, with no Python loop over labels or nodes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from xmc.cache import cache_dir, file_checksum, key_of
from xmc.data.atomic import atomic_open

log = logging.getLogger(__name__)

# Bump when the representation or the clustering changes, so stale cached clusters are not reused.
VERSION = 1
# Output coordinates each input feature is hashed into by the sparse JL projection.
SKETCH_NNZ = 8
# Elements (rows x width) of the projected document block gathered per label in one step: 64 MiB.
GATHER_ELEMENTS = 1 << 24


def label_representations(
    X: sp.spmatrix | np.ndarray, Y: sp.spmatrix | np.ndarray, max_dim: int = 256, seed: int = 0
) -> np.ndarray:
    """Unit-norm label vectors from the training documents (see the module docstring).

    Args:
        X: (N, F) training features, scipy sparse (TF-IDF, bag of words) or a dense array (embeddings).
        Y: (N, L) training labels, scipy sparse or dense; any nonzero marks a positive.
        max_dim: width kept; wider inputs are reduced by a seeded sparse JL projection to this width.
        seed: seed of the projection (unused when no projection is needed).

    Returns:
        float32 (L, min(F, max_dim)): row l is the mean of label l's documents' normalized feature
        rows (projected when F > max_dim), L2-normalized; all zeros for labels without documents.
    """
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    if max_dim < SKETCH_NNZ:
        raise ValueError(f"max_dim must be at least {SKETCH_NNZ}, got {max_dim}")
    num_docs, width = X.shape
    Y = sp.csr_matrix(Y)
    Y.eliminate_zeros()
    sketch = _sketch(width, max_dim, seed) if width > max_dim else None
    out_dim = max_dim if sketch is not None else width
    sums = np.zeros((Y.shape[1], out_dim), np.float32)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    # Documents per chunk: at most this many (document, label) pairs and documents, so the chunk's
    # dense (documents x width) rows stay within GATHER_ELEMENTS.
    budget = max(1, GATHER_ELEMENTS // out_dim)
    start = 0
    while start < num_docs:
        stop = int(np.searchsorted(Y.indptr, int(Y.indptr[start]) + budget, side="right")) - 1
        stop = min(max(stop, start + 1), start + budget, num_docs)
        rows = _normalized_rows(X[start:stop], sketch, out_dim)  # (c, out_dim) float32
        block = Y[start:stop]
        # Sum the chunk's rows per label: a (labels present, c) 0/1 matrix times the rows. Labels are
        # unique after np.unique, so the fancy-indexed += cannot drop repeated updates.
        present, local = np.unique(block.indices, return_inverse=True)
        per_label = sp.csr_matrix(
            (np.ones(block.nnz, np.float32), (local.ravel(), _row_ids(block.indptr))),
            shape=(len(present), stop - start),
        )
        sums[present] += per_label @ rows
        start = stop
    out = torch.from_numpy(sums)  # torch: multithreaded and no (L, d) temporary for the norms
    out /= torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(1e-12)  # zero rows stay zero
    return sums


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    """(nnz,) the row of each stored entry of a CSR matrix with this ``indptr``."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _sketch(width: int, out_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sparse JL matrix R (width, out_dim) as (columns, values), both (width, SKETCH_NNZ): input
    feature f adds ``values[f, k]`` (``+-1/sqrt(SKETCH_NNZ)``) to output ``columns[f, k]``, one column
    in each of SKETCH_NNZ near-equal blocks of the outputs (so a feature's columns are distinct)."""
    rng = np.random.default_rng([seed, width, out_dim])
    edges = np.arange(SKETCH_NNZ + 1) * out_dim // SKETCH_NNZ
    columns = edges[:-1] + rng.integers(0, np.diff(edges), size=(width, SKETCH_NNZ))
    signs = rng.integers(0, 2, size=(width, SKETCH_NNZ)).astype(np.float32) * 2 - 1
    return columns.astype(np.int32), signs / np.float32(np.sqrt(SKETCH_NNZ))


def _normalized_rows(
    X: sp.csr_matrix | np.ndarray, sketch: tuple[np.ndarray, np.ndarray] | None, out_dim: int
) -> np.ndarray:
    """Dense float32 (c, out_dim) rows of ``normalize(X) @ R`` (or of ``normalize(X)`` without a sketch)."""
    if sp.issparse(X):
        X = X.copy()
        row_ids = _row_ids(X.indptr)
        norms = np.sqrt(
            np.bincount(row_ids, weights=np.square(X.data, dtype=np.float64), minlength=X.shape[0])
        )
        X.data /= np.maximum(norms, 1e-12)[row_ids].astype(np.float32)
        if sketch is None:
            return X.toarray()
        # X @ R relabels each nonzero (f, v) into SKETCH_NNZ entries (columns[f], v * values[f]);
        # toarray() sums the duplicate columns this creates, so no sparse-sparse product is needed.
        columns, values = sketch
        projected = sp.csr_matrix(
            (
                (X.data[:, None] * values[X.indices]).ravel(),
                columns[X.indices].ravel(),
                X.indptr * SKETCH_NNZ,
            ),
            shape=(X.shape[0], out_dim),
        )
        return projected.toarray()
    rows = np.asarray(X, dtype=np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    if sketch is None:
        return rows
    # Dense inputs are embeddings a few thousand wide at most, so R itself is small enough to build.
    columns, values = sketch
    projection = np.zeros((rows.shape[1], out_dim), np.float32)
    projection[np.arange(rows.shape[1])[:, None], columns] = values  # a row's columns are distinct
    return rows @ projection


def balanced_clusters(reps: np.ndarray, num_clusters: int, seed: int = 0, max_iter: int = 10) -> np.ndarray:
    """Balanced hierarchical spherical 2-means (see the module docstring).

    Args:
        reps: (L, d) float label vectors, rows L2-normalized (zero rows allowed: they are placed
            wherever the balance needs them).
        num_clusters: K >= 1; need not be a power of two, and may exceed L (then some clusters are empty).
        seed: picks each node's first initial centroid (the second is the node's label least similar
            to it); the result is deterministic for a seed.
        max_iter: 2-means iterations per level at most; a level stops earlier once no label changes side.

    Returns:
        int64 (L,): the cluster of each label, in ``0..K-1``; cluster sizes are ``L // K`` or
        ``L // K + 1``.

    Memory: ``reps`` plus one padded copy of it (about 2 L d float32 in all) and O(L) indices.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    x = torch.from_numpy(np.ascontiguousarray(reps, dtype=np.float32))
    num_labels = x.shape[0]
    if num_labels == 0:
        return np.zeros(0, np.int64)
    bounds = np.arange(num_clusters + 1, dtype=np.int64) * num_labels // num_clusters  # leaf j's positions
    order = torch.arange(num_labels)  # position -> label; each node owns a contiguous range of positions
    rng = np.random.default_rng(seed)
    # Every level gathers its labels' rows into one padded batch; reusing one buffer saves faulting in
    # a fresh L x d allocation per level (in a micro-benchmark that tripled the gather's time).
    buffer = torch.empty(0)
    nodes = np.array([[0, num_clusters]], dtype=np.int64)  # leaf ranges [j0, j1) of the current level
    while len(nodes := nodes[nodes[:, 1] - nodes[:, 0] >= 2]):
        mid = (nodes[:, 0] + nodes[:, 1]) // 2
        start, stop = bounds[nodes[:, 0]], bounds[nodes[:, 1]]
        needed = len(nodes) * int((stop - start).max()) * x.shape[1]
        if buffer.numel() < needed:
            buffer = torch.empty(needed, dtype=x.dtype)
        order = _split_level(x, order, start, stop - start, bounds[mid] - start, rng, max_iter, buffer)
        nodes = np.concatenate([np.stack([nodes[:, 0], mid], 1), np.stack([mid, nodes[:, 1]], 1)])
    leaf_of_position = torch.repeat_interleave(torch.arange(num_clusters), torch.from_numpy(np.diff(bounds)))
    clusters = torch.empty(num_labels, dtype=torch.int64)
    clusters[order] = leaf_of_position
    return clusters.numpy()


def _split_level(
    x: torch.Tensor,
    order: torch.Tensor,
    start: np.ndarray,
    size: np.ndarray,
    left_size: np.ndarray,
    rng: np.random.Generator,
    max_iter: int,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Split every node of one level by balanced 2-means; return the new position -> label order.

    Node i owns positions ``start[i] .. start[i] + size[i] - 1`` of ``order``; afterwards its first
    ``left_size[i]`` positions hold the labels most similar to its first centroid. ``buffer`` holds at
    least nodes x max(size) x d elements and receives the padded rows.
    """
    nodes, width = len(start), int(size.max())
    start_t, size_t = torch.from_numpy(start), torch.from_numpy(size)
    slot = torch.arange(width)
    valid = slot < size_t[:, None]  # (nodes, width): padding slots past a node's size are invalid
    positions = (start_t[:, None] + slot).clamp_max(len(order) - 1)
    # (nodes, width, d) padded batch, padding rows zeroed so they add nothing to centroid sums.
    flat = buffer[: nodes * width * x.shape[1]].view(nodes * width, x.shape[1])
    torch.index_select(x, 0, order[positions.ravel()], out=flat)
    flat[~valid.ravel()] = 0
    xp = flat.view(nodes, width, -1)
    total = xp.sum(1)  # (nodes, d); right-side sum = total - left-side sum

    # Initial centroids: a random label of the node, and the node's label least similar to it.
    first = torch.from_numpy((rng.random(nodes) * np.maximum(size, 1)).astype(np.int64))
    rows = torch.arange(nodes)
    c0 = _unit(xp[rows, first])
    sim = torch.bmm(xp, c0.unsqueeze(-1)).squeeze(-1).masked_fill_(~valid, float("inf"))
    c1 = _unit(xp[rows, sim.argmin(1)])

    left_t = torch.from_numpy(left_size)[:, None]
    ranks = slot.expand(nodes, width)
    left = sum0 = None
    for _ in range(max_iter):
        # Sort each node's labels on x . (c0 - c1), i.e. cos(x, c0) - cos(x, c1); padding sorts last.
        scores = torch.bmm(xp, (c0 - c1).unsqueeze(-1)).squeeze(-1).masked_fill_(~valid, float("-inf"))
        perm = torch.sort(scores, dim=1, descending=True, stable=True).indices
        new_left = torch.empty_like(perm).scatter_(1, perm, ranks) < left_t  # rank < left size
        if left is None:
            sum0 = torch.bmm(new_left.to(xp.dtype).unsqueeze(1), xp).squeeze(1)  # (nodes, d) left sums
        else:
            # Only a few percent of the labels change side per iteration: update the left sums with
            # those rows instead of another pass over all of xp.
            node, where = (new_left != left).nonzero().unbind(1)
            if not len(node):
                break
            sign = new_left[node, where].to(xp.dtype) * 2 - 1  # +1: joined the left side, -1: left it
            sum0.index_add_(0, node, xp[node, where] * sign[:, None])
        left = new_left
        c0, c1 = _unit(sum0), _unit(total - sum0)
    # Node i's sorted slots, restricted to real labels, become its new positions (left part first).
    real = valid.ravel()
    new_order = order.clone()
    new_order[(start_t[:, None] + slot).ravel()[real]] = order[(start_t[:, None] + perm).ravel()[real]]
    return new_order


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)


def cluster_labels(
    X: sp.spmatrix | np.ndarray,
    Y: sp.spmatrix | np.ndarray,
    num_clusters: int,
    seed: int = 0,
    sources: Sequence[str | os.PathLike] | None = None,
    max_dim: int = 256,
) -> np.ndarray:
    """Balanced label clusters of the training set, cached when the source files are known.

    Args:
        X: (N, F) training features (sparse or dense), Y: (N, L) training labels.
        num_clusters: K; seed: seeds the projection and the clustering.
        sources: the files X and Y were read from. With them the result is cached in
            ``$XMC_CACHE/clusters/`` keyed by their checksums, K, seed, max_dim and :data:`VERSION`;
            without them nothing is cached.
        max_dim: width of the label representations (see :func:`label_representations`).

    Returns:
        int64 (L,): the cluster of each label (see :func:`balanced_clusters`).
    """
    num_labels = Y.shape[1]
    path = None
    if sources:
        checksums = [file_checksum(s) for s in sources]
        key = key_of("clusters", VERSION, *checksums, X.shape, num_labels, num_clusters, seed, max_dim)
        path = cache_dir("clusters") / f"{key}.npy"
        if path.exists():
            try:
                cached = np.load(path)
                if cached.shape == (num_labels,) and cached.dtype == np.int64:
                    return cached
            except (OSError, ValueError):
                pass  # unreadable: recompute and overwrite
            log.warning("ignoring a malformed cached clustering %s", path)
    begin = time.perf_counter()
    reps = label_representations(X, Y, max_dim=max_dim, seed=seed)
    clusters = balanced_clusters(reps, num_clusters, seed=seed)
    log.info(
        "clustered %d labels into %d clusters in %.1f s",
        num_labels,
        num_clusters,
        time.perf_counter() - begin,
    )
    if path is not None:
        with atomic_open(path) as handle:
            np.save(handle, clusters)
    return clusters
