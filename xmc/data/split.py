"""The repository's split format: features and labels in two files of the same rows.

``trn_X_Xf.txt`` (features) and ``trn_X_Y.txt`` (labels) each start with a header ``rows cols``,
then one line per row of ``id:value`` tokens (an empty line is an empty row).
"""

from __future__ import annotations

import os

import scipy.sparse as sp

from xmc.data.atomic import atomic_open
from xmc.data.errors import FormatError
from xmc.data.sparse_text import body_lines, format_rows, parse_rows, read_lines_bytes, split_header

_WRITE_CHUNK_ROWS = 50_000


def read_sparse_matrix(path: str | os.PathLike, kind: str = "feature") -> sp.csr_matrix:
    """Read one split-format file into float32 CSR ``(rows, cols)`` (int32 ids, sorted per row);
    ``kind`` names its column ids in errors (``label`` for a ``*_X_Y.txt`` file)."""
    path = os.fspath(path)
    (num_rows, num_cols), body = split_header(path, read_lines_bytes(path), 2, "rows cols")
    X, _ = parse_rows(path, body_lines(path, body, num_rows), num_cols, None, kind)
    return X


def write_sparse_matrix(path: str | os.PathLike, M: sp.spmatrix) -> None:
    """Write ``M`` in the split format (header ``rows cols``), atomically."""
    M = sp.csr_matrix(M)
    M.sort_indices()
    with atomic_open(path) as handle:
        handle.write(f"{M.shape[0]} {M.shape[1]}\n".encode())
        for start in range(0, M.shape[0], _WRITE_CHUNK_ROWS):
            lines = format_rows(M[start : start + _WRITE_CHUNK_ROWS], None)
            if lines:
                handle.write(("\n".join(lines) + "\n").encode())


def read_split(
    features_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Read ``X`` (N, F) from ``*_X_Xf.txt`` and ``Y`` (N, L) from ``*_X_Y.txt``.

    ``Y``'s stored values are replaced by ones (the repository sometimes stores relevance there).
    """
    X = read_sparse_matrix(features_path)
    Y = read_sparse_matrix(labels_path, "label")
    if X.shape[0] != Y.shape[0]:
        raise FormatError(
            labels_path,
            1,
            f"{Y.shape[0]} rows, but the features file {os.fspath(features_path)} has {X.shape[0]}",
        )
    Y.data[:] = 1.0
    return X, Y


def write_split(
    features_path: str | os.PathLike, labels_path: str | os.PathLike, X: sp.spmatrix, Y: sp.spmatrix
) -> None:
    """Write ``X`` and ``Y`` as a split-format pair."""
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    write_sparse_matrix(features_path, X)
    write_sparse_matrix(labels_path, Y)
