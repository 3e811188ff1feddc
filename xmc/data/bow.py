"""The Extreme Classification Repository's bag-of-words text format.

Line 1 is the header ``N F L`` (rows, features, labels). Each following line is one row,
``l1,l2,... f:v f:v ...`` with 0-based ids; the label field may be empty (the line then starts with a
space or directly with a feature) and a row may have no features.
"""

from __future__ import annotations

import os

import scipy.sparse as sp

from xmc.data.atomic import atomic_open
from xmc.data.sparse_text import body_lines, format_rows, parse_rows, read_lines_bytes, split_header

_WRITE_CHUNK_ROWS = 50_000


def read_bow(path: str | os.PathLike) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Read a bag-of-words file (``.gz`` allowed).

    Returns ``X`` float32 CSR ``(N, F)`` and ``Y`` float32 CSR ``(N, L)`` with ones, both with int32
    ids (int64 beyond 2**31 nonzeros) sorted within each row. Raises :class:`FormatError` naming the
    line for any malformed input.
    """
    path = os.fspath(path)
    data = read_lines_bytes(path)
    (num_rows, num_features, num_labels), body = split_header(path, data, 3, "N F L")
    lines = body_lines(path, body, num_rows)
    X, Y = parse_rows(path, lines, num_features, num_labels)
    return X, Y


def write_bow(path: str | os.PathLike, X: sp.spmatrix, Y: sp.spmatrix) -> None:
    """Write ``X`` (N, F) and ``Y`` (N, L; nonzeros are the labels) in the bag-of-words format.

    The file appears atomically; values are written in the shortest form that reads back to the
    same float32, so ``read_bow(write_bow(X, Y))`` returns equal matrices.
    """
    X, Y = sp.csr_matrix(X), sp.csr_matrix(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    with BowWriter(path, X.shape[0], X.shape[1], Y.shape[1]) as writer:
        for start in range(0, X.shape[0], _WRITE_CHUNK_ROWS):
            stop = start + _WRITE_CHUNK_ROWS
            writer.write(X[start:stop], Y[start:stop])


class BowWriter:
    """Stream rows into a bag-of-words file chunk by chunk (for data larger than memory).

    Use as a context manager; the file appears atomically when the block ends, and only if exactly
    ``num_rows`` rows were written.
    """

    def __init__(self, path: str | os.PathLike, num_rows: int, num_features: int, num_labels: int) -> None:
        self.path = os.fspath(path)
        self.shape = (num_rows, num_features, num_labels)
        self.rows_written = 0
        self._context = atomic_open(self.path)
        self._handle = None

    def __enter__(self) -> BowWriter:
        self._handle = self._context.__enter__()
        self._handle.write("{} {} {}\n".format(*self.shape).encode())
        return self

    def write(self, X: sp.spmatrix, Y: sp.spmatrix) -> None:
        """Append rows: ``X`` (n, F) features and ``Y`` (n, L) labels."""
        X, Y = sp.csr_matrix(X), sp.csr_matrix(Y)
        _, num_features, num_labels = self.shape
        if X.shape[1] != num_features or Y.shape[1] != num_labels or X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"chunk shapes X {X.shape}, Y {Y.shape} do not fit a file of {num_features} features "
                f"and {num_labels} labels"
            )
        X.sort_indices()
        Y.sort_indices()
        lines = format_rows(X, Y)
        if lines:
            self._handle.write(("\n".join(lines) + "\n").encode())
        self.rows_written += X.shape[0]

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None and self.rows_written != self.shape[0]:
            error = ValueError(
                f"{self.path}: wrote {self.rows_written} rows, the header announces {self.shape[0]}"
            )
            self._context.__exit__(ValueError, error, None)  # drops the temporary file
            raise error
        return bool(self._context.__exit__(kind, value, traceback))
