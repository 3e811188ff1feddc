"""The dense baseline: ``nn.Linear`` semantics over all labels, computed in label chunks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmc.classifiers.base import Classifier
from xmc.classifiers.chunked import shard_range
from xmc.memory.bytes import chunk_gradient_bytes, logits_bytes, optimizer_state_bytes

# Below this share of nonzero input columns in a batch (raw TF-IDF rows: ~20 of 20,000 features a
# document), the forward and the weight gradient run over those columns only (CPU: on a GPU the check
# would cost a host sync per label chunk, and the dense product is cheap there).
SPARSE_COLUMN_SHARE = 0.5


def active_columns(h: torch.Tensor) -> torch.Tensor | None:
    """The columns of a CPU ``h`` (B, D) holding a nonzero, or None when more than SPARSE_COLUMN_SHARE
    do (or ``h`` is on an accelerator)."""
    if h.device.type != "cpu":
        return None
    nonzero = h.ne(0).any(0)
    count = int(nonzero.sum())
    if count > SPARSE_COLUMN_SHARE * h.shape[1]:
        return None
    return nonzero.nonzero().squeeze(1)


class DenseClassifier(Classifier):
    """``logits = h W^T + b`` with ``weight`` (L, D) and ``bias`` (L,), initialized like ``nn.Linear``."""

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        label_offset: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.num_labels, self.label_offset = in_features, num_labels, label_offset
        self.weight = nn.Parameter(torch.empty(num_labels, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_labels, device=device, dtype=dtype)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def chunk_logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[start:stop]
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.weight.dtype)  # e.g. bf16 activations recomputed outside autocast in backward
        columns = active_columns(h)
        if columns is not None:  # raw sparse features: the zero columns add nothing to any logit
            return F.linear(h[:, columns], self.weight[start:stop, columns], bias)
        return F.linear(h, self.weight[start:stop], bias)

    def chunk_backward(self, h, grad_logits, start, stop, need_input=True):
        weight = self.weight[start:stop]
        g = grad_logits.to(weight.dtype)
        grad_h = g @ weight if need_input else None
        h = h.to(weight.dtype)
        columns = active_columns(h)
        if columns is None:
            grad_w = g.t() @ h
        else:  # exactly zero off the batch's columns
            grad_w = torch.zeros_like(weight)
            grad_w[:, columns] = g.t() @ h[:, columns]
        grads = [grad_w] + ([g.sum(0)] if self.bias is not None else [])
        return grad_h, grads

    def label_parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @classmethod
    def state_bytes(
        cls,
        in_features: int,
        num_labels: int,
        *,
        batch_size: int = 0,
        optimizer: str = "adamw",
        param_bytes: int = 4,
        master_weights: bool = False,
        bias: bool = True,
    ) -> dict[str, int]:
        num_params = num_labels * in_features + (num_labels if bias else 0)
        return {
            "weights": num_params * param_bytes,
            "master_weights": 4 * num_params if master_weights else 0,
            "gradients": num_params * param_bytes,
            "optimizer": optimizer_state_bytes(num_params, optimizer),
            "logits": logits_bytes(num_labels, batch_size),
            # With several label chunks, one chunk's weight gradient exists before it is written.
            "chunk_gradient": chunk_gradient_bytes(num_labels, batch_size, in_features + bias, param_bytes),
        }

    def shape_options(self) -> dict:
        return {"bias": self.bias is not None}

    def shard(self, rank: int, world: int) -> DenseClassifier:
        start, stop = shard_range(self.num_labels, rank, world)
        part = DenseClassifier(
            self.in_features,
            stop - start,
            self.bias is not None,
            self.weight.device,
            self.weight.dtype,
            label_offset=self.label_offset + start,
        )
        with torch.no_grad():
            part.weight.copy_(self.weight[start:stop])
            if self.bias is not None:
                part.bias.copy_(self.bias[start:stop])
        return part

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_labels={self.num_labels}, bias={self.bias is not None}"
