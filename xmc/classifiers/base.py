"""The classifier interface every backend (dense, fixed fan-in, RPS) implements.

The training loop, the memory planner and prediction talk to classifiers only through it:

- ``num_labels``, ``in_features``, ``label_offset`` (global id of local label 0, for label shards);
- ``forward(h) -> (B, L)`` logits, for small L;
- ``loss(h, positives, kind) -> scalar``, the mean loss over all B x L pairs, computed label chunk
  by label chunk so that the B x L logits never exist in full. While gradients are wanted the loss is
  fused (``fused_loss``, the default): each chunk's gradients are computed with its loss, in one pass,
  and handed to autograd in backward (scaled by the upstream gradient); otherwise, or with fp16
  activations (whose loss scale is known only in backward), the backward recomputes each chunk;
- ``topk(h, k) -> (scores, ids)`` over all labels in bounded memory, ties to the lower label id;
- ``state_bytes(in_features, num_labels, ...)``, a classmethod, for the memory planner: bytes by
  component computed from the shape alone, so a plan never allocates the model
  (``instance.memory(batch_size)`` asks the same of a built classifier);
- ``shard(rank, world)``: the same classifier restricted to a contiguous label range;
  ``label_state_names()`` names what a shard slices (label-indexed weights and ids).

A backend implements ``chunk_logits`` and ``chunk_backward`` for a label range (and may replace
``chunk_loss_step``, a chunk's loss with its gradients, by a fused kernel) and lists its
label-indexed parameters in ``label_parameters`` (dimension 0 runs over labels) and any parameters
every label chunk reads (RPS's shared array) in ``shared_parameters``; the rest is shared code.
"""

from __future__ import annotations

import abc

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from xmc.inference.topk import topk_merge_torch
from xmc.losses import Positives, chunk_loss_and_grad

# Scores held per label chunk: B x chunk <= this many elements (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22


class Classifier(nn.Module, abc.ABC):
    """Base class of all classifiers over L labels (see the module docstring)."""

    in_features: int
    num_labels: int
    label_offset: int = 0
    # Gradients computed with the loss in one pass (train.fused_loss); False recomputes in backward.
    fused_loss: bool = True

    @abc.abstractmethod
    def chunk_logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """(B, D) -> (B, stop - start) logits of local labels ``start..stop-1`` (differentiable)."""

    @abc.abstractmethod
    def chunk_backward(
        self, h: torch.Tensor, grad_logits: torch.Tensor, start: int, stop: int, need_input: bool = True
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Given d(loss)/d(logits) of labels ``start..stop-1`` (B, c), return the gradient to ``h``
        (B, D) (None when ``need_input`` is false, e.g. fixed features into the classifier) and, per
        ``label_parameters()`` entry, the gradient of its rows ``start..stop-1``, followed by, per
        ``shared_parameters()`` entry, this chunk's share of its whole gradient."""

    @abc.abstractmethod
    def label_parameters(self) -> list[nn.Parameter]:
        """Parameters whose dimension 0 runs over the labels (weights, bias)."""

    def label_bias(self) -> nn.Parameter | None:
        """The (num_labels,) bias added to every logit, or None."""
        return getattr(self, "bias", None)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters read by every label chunk (gradients summed over chunks); none by default."""
        return []

    def label_state_names(self) -> list[str]:
        """Names in ``state_dict()`` of the tensors whose dimension 0 runs over the labels: the
        ``label_parameters`` and the buffers of ``num_labels`` rows (fixed fan-in ids). A label shard
        holds rows of these and replicates the rest; a checkpoint stores them whole."""
        label = {id(p) for p in self.label_parameters()}
        names = [n for n, p in self.named_parameters() if id(p) in label]
        names += [n for n, b in self.named_buffers() if b.dim() >= 1 and b.shape[0] == self.num_labels]
        return names

    @classmethod
    @abc.abstractmethod
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
        **options,
    ) -> dict[str, int]:
        """Bytes of a classifier of this shape during training, by component, without building it.

        ``param_bytes`` is the storage size of parameters and gradients (4 fp32, 2 bf16/fp16);
        ``master_weights`` adds an fp32 copy; ``options`` are the backend's own shape knobs
        (``fan_in`` for fixed fan-in). Components: weights, any index structures, master weights,
        gradients, optimizer state (fp32), and ``logits``: one label chunk's scores and their
        gradient (fp32) during the chunked loss.
        """

    @abc.abstractmethod
    def shape_options(self) -> dict:
        """The keyword arguments of :meth:`state_bytes` that describe this instance (``bias`` and the
        backend's options)."""

    def memory(self, batch_size: int = 0, optimizer: str = "adamw", master_weights: bool = False) -> dict:
        """:meth:`state_bytes` for this built classifier."""
        params = self.label_parameters() + self.shared_parameters()
        return self.state_bytes(
            self.in_features,
            self.num_labels,
            batch_size=batch_size,
            optimizer=optimizer,
            param_bytes=params[0].element_size(),
            master_weights=master_weights,
            **self.shape_options(),
        )

    @abc.abstractmethod
    def shard(self, rank: int, world: int) -> Classifier:
        """A copy restricted to this rank's contiguous label range (see :func:`shard_range`)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.chunk_logits(h, 0, self.num_labels)

    def label_chunk(self, batch_size: int) -> int:
        return label_chunk(self.num_labels, batch_size)

    def loss(self, h: torch.Tensor, positives: Positives, kind: str = "bce") -> torch.Tensor:
        """Mean ``kind`` loss over all (document, label) pairs of the batch; see :mod:`xmc.losses`."""
        if positives.batch_size != h.shape[0]:
            raise ValueError(f"{positives.batch_size} rows of positives for a batch of {h.shape[0]}")
        if positives.num_labels != self.num_labels:
            raise ValueError(
                f"positives over {positives.num_labels} labels for a {self.num_labels}-label classifier"
            )
        params = [*self.label_parameters(), *self.shared_parameters()]
        wanted = h.requires_grad or any(p.requires_grad for p in params)
        if torch.is_grad_enabled() and wanted and fused_loss_applies(self.fused_loss, fp16=_fp16(h)):
            return _FusedChunkedLoss.apply(h, positives, self, kind, *params)
        return _ChunkedLoss.apply(h, positives, self, kind, *params)

    def chunk_loss_step(
        self,
        h: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        kind: str,
        scale: float | torch.Tensor,
        start: int,
        stop: int,
        need_input: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        """The summed loss of labels ``start..stop-1`` (positives at ``(rows, cols)``, cols counted from
        ``start``) and its gradients times ``scale``, as :meth:`chunk_backward` returns them:
        ``(loss_sum, grad_h part or None, per-parameter parts)``."""
        logits = self.chunk_logits(h, start, stop)
        total, g = chunk_loss_and_grad(logits, rows, cols, kind, want_grad=True)
        g = (g * scale).to(logits.dtype)
        del logits
        # As in a backward pass, which runs outside the caller's autocast: the same products either way.
        with torch.autocast(h.device.type, enabled=False):
            part_h, parts = self.chunk_backward(h, g, start, stop, need_input=need_input)
        return total, part_h, parts

    @torch.no_grad()
    def dense_gradient(
        self, h: torch.Tensor, positives: Positives, kind: str, start: int, stop: int
    ) -> torch.Tensor:
        """(stop - start, D) gradient (float32; float64 for float64 inputs) of :meth:`loss` with respect
        to a dense weight matrix of labels ``start..stop-1``, at the current logits: ``g^T h`` with ``g``
        the logits' gradient. What gradient regrowth (RigL) ranks absent connections by; only ever asked
        for a label chunk."""
        logits = self.chunk_logits(h, start, stop)
        _, g = chunk_loss_and_grad(logits, *positives.block(start, stop), kind, want_grad=True)
        return (g.t() @ h.to(g.dtype)) / (h.shape[0] * self.num_labels)

    @torch.no_grad()
    def topk(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` (scores float32 (B, k), global label ids int64 (B, k)), best first, ties to the
        lower id; ``-inf`` / ``-1`` pad rows when ``k`` exceeds the label count."""
        best_scores = torch.full((h.shape[0], k), float("-inf"), device=h.device)
        best_ids = torch.full((h.shape[0], k), -1, dtype=torch.int64, device=h.device)
        step = self.label_chunk(h.shape[0])
        for start in range(0, self.num_labels, step):
            stop = min(start + step, self.num_labels)
            scores = self.chunk_logits(h, start, stop).float()
            best_scores, best_ids = topk_merge_torch(
                best_scores, best_ids, scores, self.label_offset + start, k
            )
        return best_scores, best_ids


def fused_loss_applies(fused_loss: bool, fp16: bool) -> bool:
    """Whether a training step computes the classifier's gradients with its loss in one pass (the fused
    path; on CUDA, for a plain fixed fan-in layer, one Triton kernel per label range, at any batch size):
    ``train.fused_loss`` on and no fp16. Under fp16 (activations, or autocast to fp16) a chunk's gradient
    must be multiplied by the loss scale before it is rounded, and only the backward pass knows that scale,
    so the loss recomputes each chunk's logits there. The runtime decides with this function, and the
    shipped configs are checked with it (they use bf16, where both precisions exist)."""
    return fused_loss and not fp16


def _fp16(h: torch.Tensor) -> bool:
    """Whether the loss meets fp16 (activations, or autocast to fp16): its gradients are then scaled by the
    loss scale before they are rounded, which only the backward pass knows."""
    device = h.device.type
    return h.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )


def label_chunk(num_labels: int, batch_size: int) -> int:
    """Labels scored at a time for a batch of ``batch_size`` (B x chunk <= ``CHUNK_ELEMENTS``)."""
    return max(1, min(num_labels, CHUNK_ELEMENTS // max(batch_size, 1)))


def logits_bytes(num_labels: int, batch_size: int) -> int:
    """The chunked loss's working set, bounded by four label-chunk blocks in fp32: the scores, their fp32
    copy (under autocast), the loss gradient and its scaled copy, alive together in backward."""
    return 4 * batch_size * label_chunk(num_labels, batch_size) * 4


def chunk_gradient_bytes(num_labels: int, batch_size: int, row_params: int, param_bytes: int) -> int:
    """A label chunk's parameter gradient before it is written into the whole gradient: only when
    the labels take more than one chunk (one chunk's gradient is the whole gradient)."""
    chunk = label_chunk(num_labels, batch_size)
    return 0 if chunk >= num_labels else chunk * row_params * param_bytes


def shard_range(num_labels: int, rank: int, world: int) -> tuple[int, int]:
    """Labels ``[start, stop)`` of ``rank`` among ``world`` near-equal contiguous shards."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    base, extra = divmod(num_labels, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def optimizer_state_bytes(num_params: int, optimizer: str) -> int:
    """Bytes of optimizer state for ``num_params`` values: AdamW keeps two fp32 moments, SGD one;
    ``adamw-bf16`` (``xmc.optim.LowPrecisionAdamW``) two bf16 moments."""
    per = {"adamw": 8, "adam": 8, "adamw-bf16": 4, "sgd": 4, "none": 0}
    if optimizer not in per:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(per)}")
    return per[optimizer] * num_params


class _ChunkedLoss(torch.autograd.Function):
    """Mean loss over label chunks; saves only ``h`` and recomputes each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, h, positives: Positives, classifier: Classifier, kind: str, *params):
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
        classifier: Classifier = ctx.classifier
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


class _FusedChunkedLoss(torch.autograd.Function):
    """Mean loss over label chunks with every gradient computed in the same pass (one logits pass instead of
    two); backward scales the kept gradients by the upstream gradient, in place."""

    @staticmethod
    def forward(ctx, h, positives: Positives, classifier: Classifier, kind: str, *params):
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
    classifier: Classifier,
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


def _chunks(classifier: Classifier, batch_size: int):
    step = classifier.label_chunk(batch_size)
    for start in range(0, classifier.num_labels, step):
        yield start, min(start + step, classifier.num_labels)
