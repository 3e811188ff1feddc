"""XMC losses over sparse positives, and the positives themselves.

Targets are never built as a dense B x L matrix: a batch's positives travel as CSR (``Positives``), and a
label chunk's loss is computed as if every pair were negative, then corrected at the chunk's few positive
coordinates (:func:`chunk_loss_and_grad`), so no target block is materialized or multiplied. That per-chunk
loss and ``LOSSES`` are defined in :mod:`xmc.kernels.losses` (the kernels' reference twins use them too) and
re-exported here.

Both losses are means over all B x L (document, label) pairs, as ``torch.nn.BCEWithLogitsLoss`` and
the anchors' squared hinge average them:
- BCE with logits: ``softplus(z) - y z``; gradient ``sigmoid(z) - y``.
- squared hinge with ``s = 2y - 1``: ``max(0, 1 - s z)^2``; gradient ``-2 s max(0, 1 - s z)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from xmc.kernels.losses import LOSSES, chunk_loss_and_grad

__all__ = ["LOSSES", "Positives", "chunk_loss_and_grad", "dense_loss"]


@dataclass
class Positives:
    """The positive labels of a batch as CSR: ``indptr`` (B+1,) int64, ``indices`` (nnz,) int64."""

    indptr: torch.Tensor
    indices: torch.Tensor
    num_labels: int

    @property
    def batch_size(self) -> int:
        return self.indptr.numel() - 1

    @classmethod
    def from_csr(cls, Y: sp.spmatrix, device: torch.device | str | None = None) -> Positives:
        Y = sp.csr_matrix(Y)
        return cls(
            torch.as_tensor(Y.indptr.astype(np.int64), device=device),
            torch.as_tensor(Y.indices.astype(np.int64), device=device),
            Y.shape[1],
        )

    @classmethod
    def from_lists(
        cls, rows: Sequence[Sequence[int]], num_labels: int, device: torch.device | str | None = None
    ) -> Positives:
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        ids = np.fromiter((i for r in rows for i in r), np.int64, int(indptr[-1]))
        if len(ids) and (ids.min() < 0 or ids.max() >= num_labels):
            raise ValueError(f"label ids must lie in 0..{num_labels - 1}")
        return cls(torch.as_tensor(indptr, device=device), torch.as_tensor(ids, device=device), num_labels)

    def to(self, device: torch.device | str) -> Positives:
        return Positives(self.indptr.to(device), self.indices.to(device), self.num_labels)

    def rows(self) -> torch.Tensor:
        """(nnz,) the batch row of each positive."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.indptr.device), counts)

    def remap(self, position: torch.Tensor) -> Positives:
        """The same positives with label ``i`` renamed ``position[i]`` (``position`` a permutation of
        ``0..L-1``): a classifier that stores its labels in another order sees its own positions."""
        return Positives(self.indptr, position.to(self.indices.device)[self.indices], self.num_labels)

    def select(self, start: int, stop: int) -> Positives:
        """The positives among labels ``start..stop-1``, counted from ``start``, as positives over
        ``stop - start`` labels (each document keeps its row, possibly empty)."""
        inside = (self.indices >= start) & (self.indices < stop)
        counts = torch.zeros(self.batch_size, dtype=torch.int64, device=self.indptr.device)
        counts.index_add_(0, self.rows()[inside], torch.ones_like(self.indices[inside]))
        indptr = torch.zeros_like(self.indptr)
        torch.cumsum(counts, 0, out=indptr[1:])
        return Positives(indptr, self.indices[inside] - start, stop - start)

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the distinct positives among labels ``start..stop-1``, columns counted
        from ``start`` (a label listed twice for a document counts once, as in :meth:`dense`)."""
        inside = (self.indices >= start) & (self.indices < stop)
        width = stop - start
        flat = torch.unique(self.rows()[inside] * width + (self.indices[inside] - start))
        return flat // width, flat % width

    def dense(
        self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The (B, stop - start) 0/1 target block of labels ``start..stop-1``."""
        stop = self.num_labels if stop is None else stop
        block = torch.zeros(self.batch_size, stop - start, dtype=dtype, device=self.indices.device)
        inside = (self.indices >= start) & (self.indices < stop)
        block[self.rows()[inside], self.indices[inside] - start] = 1
        return block


def dense_loss(logits: torch.Tensor, positives: Positives, kind: str = "bce") -> torch.Tensor:
    """Mean loss of full (B, L) logits, differentiable by autograd (the reference for chunked losses)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = positives.dense(dtype=z.dtype)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(z, targets)
    if kind == "squared_hinge":
        return torch.clamp(1 - (2 * targets - 1) * z, min=0).square().mean()
    raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
