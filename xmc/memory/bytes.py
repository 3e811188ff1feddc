"""Byte arithmetic shared by the classifiers' ``state_bytes`` and the memory planner."""

from __future__ import annotations

from xmc.classifiers.chunked import label_chunk


def logits_bytes(num_labels: int, batch_size: int) -> int:
    """The chunked loss's working set, bounded by four label-chunk blocks in fp32: the scores, their fp32
    copy (under autocast), the loss gradient and its scaled copy, alive together in backward."""
    return 4 * batch_size * label_chunk(num_labels, batch_size) * 4


def chunk_gradient_bytes(num_labels: int, batch_size: int, row_params: int, param_bytes: int) -> int:
    """A label chunk's parameter gradient before it is written into the whole gradient: only when
    the labels take more than one chunk (one chunk's gradient is the whole gradient)."""
    chunk = label_chunk(num_labels, batch_size)
    return 0 if chunk >= num_labels else chunk * row_params * param_bytes


def optimizer_state_bytes(num_params: int, optimizer: str) -> int:
    """Bytes of optimizer state for ``num_params`` values: AdamW keeps two fp32 moments, SGD one;
    ``adamw-bf16`` (``xmc.optim.LowPrecisionAdamW``) two bf16 moments."""
    per = {"adamw": 8, "adam": 8, "adamw-bf16": 4, "sgd": 4, "none": 0}
    if optimizer not in per:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(per)}")
    return per[optimizer] * num_params
