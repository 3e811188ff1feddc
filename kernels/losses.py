"""The per-chunk loss shared by the kernels' reference twins and the classifiers: plain PyTorch.

A label chunk's loss is computed as if every pair were negative, then corrected at the chunk's few positive
coordinates (:func:`chunk_loss_and_grad`), so no target block is materialized or multiplied. The fused-loss
kernel (:mod:`xmc.kernels.fixed_fanin_loss`) computes the same loss in registers; its twin calls this.

Both losses (``LOSSES``), as the classifiers average them over all B x L (document, label) pairs:
- BCE with logits: ``softplus(z) - y z``; gradient ``sigmoid(z) - y``.
- squared hinge with ``s = 2y - 1``: ``max(0, 1 - s z)^2``; gradient ``-2 s max(0, 1 - s z)``.

:mod:`xmc.losses` (the positives as CSR, the dense reference loss) re-exports both names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "chunk_loss_and_grad"]

LOSSES = ("bce", "squared_hinge")


def chunk_loss_and_grad(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, kind: str, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss of a logit block whose positives sit at ``(rows, cols)`` (distinct) and, if
    asked, its gradient d(sum)/d(logits); computed in fp32 (float64 for float64 logits).

    Every pair is first scored as a negative (BCE ``softplus(z)``, gradient ``sigmoid(z)``; squared
    hinge ``max(0, 1 + z)^2``, gradient ``2 max(0, 1 + z)``), then the positives' terms are swapped for
    their positive form: one elementwise pass over the block instead of building, converting and
    multiplying a dense 0/1 target block."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    zp = z[rows, cols]
    if kind == "bce":
        total = F.softplus(z).sum() - zp.sum()
        if not want_grad:
            return total, None
        grad = torch.sigmoid(z)
        grad[rows, cols] -= 1
        return total, grad
    if kind == "squared_hinge":
        negative = torch.clamp(1 + z, min=0)
        total = (
            negative.square().sum()
            - torch.clamp(1 + zp, min=0).square().sum()
            + torch.clamp(1 - zp, min=0).square().sum()
        )
        if not want_grad:
            return total, None
        grad = negative.mul_(2)
        grad[rows, cols] = -2 * torch.clamp(1 - zp, min=0)
        return total, grad
    raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
