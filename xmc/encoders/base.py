"""What every encoder and every inputs object provides.

The training loop sees only this contract: an inputs object turns document rows into a dict of CPU
tensors, an encoder turns that dict into ``(B, out_features)`` representations for the classifier. What a
data split hands to the encoder factory is :class:`xmc.data.source.SplitSource`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class Inputs(Protocol):
    """The encoder inputs of one split's documents."""

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """CPU tensors for the documents ``rows`` (int64 ``(B,)``), in that order."""
        ...


class Encoder(nn.Module):
    """Base of the encoders: ``forward(batch) -> (B, out_features)``, dropout applied in training mode."""

    out_features: int

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
