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

The chunked loss itself (its two autograd functions) and the label ranges live in
:mod:`xmc.classifiers.chunked`; the byte arithmetic behind ``state_bytes`` in :mod:`xmc.memory.bytes`.

A backend implements ``chunk_logits`` and ``chunk_backward`` for a label range (and may replace
``chunk_loss_step``, a chunk's loss with its gradients, by a fused kernel) and lists its
label-indexed parameters in ``label_parameters`` (dimension 0 runs over labels) and any parameters
every label chunk reads (RPS's shared array) in ``shared_parameters``; the rest is shared code.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from xmc.classifiers.chunked import ChunkedLoss, FusedChunkedLoss, fp16_loss, fused_loss_applies, label_chunk
from xmc.inference.topk import topk_merge_torch
from xmc.losses import Positives, chunk_loss_and_grad


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

    @torch.no_grad()
    def set_label_bias(self, values: torch.Tensor) -> bool:
        """Set every label's bias from ``values`` (L,) in label-id order; False when there is no bias."""
        bias = self.label_bias()
        if bias is None:
            return False
        bias.copy_(values.to(bias.dtype))
        return True

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
        if torch.is_grad_enabled() and wanted and fused_loss_applies(self.fused_loss, fp16=fp16_loss(h)):
            return FusedChunkedLoss.apply(h, positives, self, kind, *params)
        return ChunkedLoss.apply(h, positives, self, kind, *params)

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
