"""Precomputed embeddings (``.npy``, e.g. written by ``xmc embed``) used as the encoder's output.

The encoder has no parameters: it passes the stored vectors through dropout, so the classifier
trains on fixed features.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from xmc.encoders.base import Encoder

_DTYPES = (np.float16, np.float32)


def load_features(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a ``.npy`` file of embeddings, float16 or float32 ``(N, d)``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    features = np.load(path, mmap_mode="r")
    check_features(features, path)
    return features


def check_features(features: np.ndarray, name: str = "features") -> None:
    """Raise ``ValueError`` unless ``features`` is a float16 / float32 matrix."""
    if features.ndim != 2:
        raise ValueError(
            f"{name}: embeddings must be a 2-D array (documents x dims), got shape {features.shape}"
        )
    if features.dtype not in _DTYPES:
        raise ValueError(f"{name}: embeddings must be float16 or float32, got {features.dtype}")


class FeaturesInputs:
    """Rows of a precomputed embedding matrix; ``batch(rows)`` returns ``features`` float32 ``(B, d)``."""

    def __init__(self, features: np.ndarray) -> None:
        check_features(features)
        self.features = features

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        # Fancy indexing copies just these rows out of the memory map.
        block = np.asarray(self.features[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
        return {"features": torch.from_numpy(block)}


class FeaturesEncoder(Encoder):
    """Identity on ``features`` ``(B, dim)``, then dropout (training mode only); no parameters."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_features = dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dropout(batch["features"])
