"""The classifiers' loss over label chunks, and the label ranges it and label sharding use.

The mean loss over all B x L (document, label) pairs is computed ``label_chunk(L, B)`` labels at a time,
so the B x L logits never exist in full. :class:`ChunkedLoss` saves only the classifier's input and
recomputes each chunk's logits in backward; :class:`FusedChunkedLoss` computes each chunk's gradients
with its loss in the same pass and scales them by the upstream gradient in backward
(:func:`fused_loss_applies` says which one a step takes). Both call the classifier's
``chunk_logits`` / ``chunk_loss_step`` (:class:`xmc.classifiers.base.Classifier`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from xmc.losses import Positives, chunk_loss_and_grad

# Scores held per label chunk: B x chunk <= this many elements (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22


def label_chunk(num_labels: int, batch_size: int) -> int:
    """Labels scored at a time for a batch of ``batch_size`` (B x chunk <= ``CHUNK_ELEMENTS``)."""
    return max(1, min(num_labels, CHUNK_ELEMENTS // max(batch_size, 1)))


def shard_range(num_labels: int, rank: int, world: int) -> tuple[int, int]:
    """Labels ``[start, stop)`` of ``rank`` among ``world`` near-equal contiguous shards."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    base, extra = divmod(num_labels, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def fused_loss_applies(fused_loss: bool, fp16: bool) -> bool:
    """Whether a training step computes the classifier's gradients with its loss in one pass (the fused
    path; on CUDA, for a plain fixed fan-in layer, one Triton kernel per label range, at any batch size):
    ``train.fused_loss`` on and no fp16. Under fp16 (activations, or autocast to fp16) a chunk's gradient
    must be multiplied by the loss scale before it is rounded, and only the backward pass knows that scale,
    so the loss recomputes each chunk's logits there. The runtime decides with this function, and the
    shipped configs are checked with it (they use bf16, where both precisions exist)."""
    return fused_loss and not fp16


def fp16_loss(h: torch.Tensor) -> bool:
    """Whether the loss meets fp16 (activations, or autocast to fp16): its gradients are then scaled by the
    loss scale before they are rounded, which only the backward pass knows."""
    device = h.device.type
    return h.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )


class ChunkedLoss(torch.autograd.Function):
    """Mean loss over label chunks; saves only ``h`` and recomputes each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, h, positives: Positives, classifier, kind: str, *params):
        ctx.save_for_backward(h)
        ctx.positives, ctx.classifier, ctx.kind = positives, classifier, kind
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        with torch.no_grad():
            for start, stop in _chunks(classifier, h.shape[0]):
                logits = classifier.chunk_logits(h, start, stop)
                part, _ = chunk_loss_and_grad(logits, *positives.block(start, stop), kind, want_grad=False)
                total += part
        return total / (h.shape[0] * classifier.num_labels)

    @staticmethod
    def backward(ctx, grad_output):
        (h,) = ctx.saved_tensors
        classifier = ctx.classifier
        scale = grad_output / (h.shape[0] * classifier.num_labels)
        with torch.no_grad():
            _, grad_h, grads = _loss_and_gradients(
                classifier,
                h,
                ctx.positives,
                ctx.kind,
                scale,
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[4:],
            )
        return (grad_h, None, None, None, *grads)


class FusedChunkedLoss(torch.autograd.Function):
    """Mean loss over label chunks with every gradient computed in the same pass (one logits pass instead of
    two); backward scales the kept gradients by the upstream gradient, in place."""

    @staticmethod
    def forward(ctx, h, positives: Positives, classifier, kind: str, *params):
        size = h.shape[0] * classifier.num_labels
        total, grad_h, grads = _loss_and_gradients(
            classifier, h, positives, kind, 1.0 / size, ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        )
        ctx.gradients = (grad_h, grads)
        return total / size

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_h, grads = ctx.gradients
        del ctx.gradients
        for grad in (grad_h, *grads):
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
        return (grad_h, None, None, None, *grads)


def _loss_and_gradients(
    classifier,
    h: torch.Tensor,
    positives: Positives,
    kind: str,
    scale: float | torch.Tensor,
    need_h: bool,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """Summed loss over every label chunk and the gradients (times ``scale``) to ``h`` (in h's dtype; None
    unless ``need_h``) and to each parameter of ``label_parameters() + shared_parameters()`` marked in
    ``needs``. One chunk's gradients are the whole gradients, used as they come (no second buffer); with
    several, label-indexed rows are written once each and shared parameters summed."""
    num_label_params = len(classifier.label_parameters())
    params = classifier.label_parameters() + classifier.shared_parameters()
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    grad_h = torch.zeros(h.shape, dtype=total.dtype, device=h.device) if need_h else None
    chunks = list(_chunks(classifier, h.shape[0]))
    single = len(chunks) == 1
    grads = [
        None if not need or single else (torch.empty_like(p) if i < num_label_params else torch.zeros_like(p))
        for i, (p, need) in enumerate(zip(params, needs, strict=True))
    ]
    for start, stop in chunks:
        rows, cols = positives.block(start, stop)
        part, part_h, part_params = classifier.chunk_loss_step(
            h, rows, cols, kind, scale, start, stop, need_h
        )
        total += part
        if grad_h is not None:
            grad_h += part_h
        for i, grad in enumerate(part_params):
            if not needs[i] or grad is None:
                continue
            if single:
                grads[i] = grad.to(params[i].dtype)
            elif i < num_label_params:
                grads[i][start:stop] = grad
            else:
                grads[i] += grad
    if grad_h is not None:
        grad_h = grad_h.to(h.dtype)
    return total, grad_h, grads


def _chunks(classifier, batch_size: int):
    step = classifier.label_chunk(batch_size)
    for start in range(0, classifier.num_labels, step):
        yield start, min(start + step, classifier.num_labels)
