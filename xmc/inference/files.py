"""Top-k prediction files: ``.npz`` archives with ``indices`` int32 ``(N, k)`` and ``scores`` float32
``(N, k)``, each row in rank order, ``-1`` / ``-inf`` where a row has fewer than k predictions.
``xmc predict`` writes them and ``xmc evaluate`` reads them."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from xmc.data.atomic import atomic_open

_INT32 = np.iinfo(np.int32)


def save_predictions(path: str | os.PathLike, scores: np.ndarray, indices: np.ndarray) -> None:
    """Write ``scores`` (float ``(N, k)``) and ``indices`` (integer ``(N, k)``, ``-1`` = none) to
    ``path`` as an uncompressed ``.npz``, stored as float32 and int32.

    The file appears only once complete (written beside ``path``, then renamed), so a reader never
    sees half of it. Raises ``ValueError`` for mismatched shapes, non-integer indices, or ids that
    are below ``-1`` or do not fit int32.
    """
    scores = np.asarray(scores)
    indices = np.asarray(indices)
    _check(scores, indices, "")
    with atomic_open(path) as handle:
        np.savez(handle, indices=indices.astype(np.int32), scores=scores.astype(np.float32))


def load_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a prediction file: ``(scores float32 (N, k), indices int32 (N, k))``.

    Integer indices of another width and floating scores of another precision (as other tools
    may write) are converted. Raises ``FileNotFoundError`` for a missing file and ``ValueError``,
    naming the file, for anything else that is not a valid prediction file: not an ``.npz``
    archive, a missing array, non-2-D or mismatched shapes, wrong dtype kinds, ids below ``-1``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prediction file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a prediction file (expected an .npz archive): {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a prediction file (a single .npy array, expected an .npz archive)")
    with archive:
        missing = [key for key in ("indices", "scores") if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: prediction file lacks {' and '.join(repr(k) for k in missing)} "
                f"(it holds {sorted(archive.files)})"
            )
        try:
            indices, scores = archive["indices"], archive["scores"]
        except ValueError as err:  # e.g. an object array, which needs pickle
            raise ValueError(f"{path}: unreadable prediction arrays: {err}") from None
    _check(scores, indices, f"{path}: ")
    return scores.astype(np.float32, copy=False), indices.astype(np.int32, copy=False)


def _check(scores: np.ndarray, indices: np.ndarray, where: str) -> None:
    """Shapes, dtype kinds and id range of a prediction pair; ``where`` prefixes the messages."""
    if indices.ndim != 2 or scores.shape != indices.shape:
        raise ValueError(
            f"{where}'indices' {indices.shape} and 'scores' {scores.shape} must be 2-D arrays "
            "of one shape (the same shape (N, k) for both)"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{where}'indices' must be integers (int32 label ids), got {indices.dtype}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"{where}'scores' must be floating point (float32), got {scores.dtype}")
    if indices.size and (indices.min() < -1 or indices.max() > _INT32.max):
        raise ValueError(
            f"{where}'indices' must lie in -1..{_INT32.max}, got {indices.min()}..{indices.max()}"
        )
