"""A dense head over the most frequent labels and a fixed fan-in tail over the rest (HASTE's layout).

Labels are stored in an internal order: positions ``0..N-1`` hold the head (``classifier.dense_head`` = N,
the N most frequent training labels), positions ``N..L-1`` the tail, a :class:`FixedFanInClassifier`
(plain or grouped). The ``order`` buffer maps a position to its label id and ``position`` maps back; with
``classifier.label_order=semantic`` the tail's positions are sorted so that each group of G consecutive
positions holds related labels (:func:`semantic_order`). The permutation never leaves this class: the
loss takes positives in label ids, ``forward`` returns logits in label-id order and ``topk`` label ids
(ties to the lower id, as every classifier). With N = 0 the class is a fixed fan-in layer over permuted
labels; with N = L a dense layer over permuted labels.

The loss is one mean over all B x L pairs: the head's and the tail's own chunked (fused) losses, each a
mean over its part, weighted by their label counts. The encoder thus gets a dense gradient from the
head's labels, which the sparse tail alone would give it only through K of D inputs per label.

With ``head_trained=False`` (``classifier.head_fit=svm``) the head is fitted outside gradient descent
(:mod:`xmc.classifiers.svm`, over fixed inputs) and frozen: its weights are no ``label_parameters``, take
no gradient or optimizer state, and the loss is the tail's share alone (the head's term is a constant).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xmc.classifiers.base import Classifier
from xmc.classifiers.dense import DenseClassifier
from xmc.classifiers.fixed_fanin import FixedFanInClassifier
from xmc.inference.topk import topk_merge_lists_torch
from xmc.losses import Positives


class HeadTailClassifier(Classifier):
    """``head`` (a :class:`DenseClassifier` over ``head_size`` labels, or None) and ``tail`` (a
    :class:`FixedFanInClassifier` over the rest, or None), with the label permutation ``order``."""

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        head_size: int,
        fan_in: int,
        bias: bool = True,
        *,
        seed: int = 0,
        group: int = 1,
        head_trained: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= head_size <= num_labels:
            raise ValueError(
                f"classifier.dense_head must lie in 0..{num_labels} (the label count), got {head_size}"
            )
        self.in_features, self.num_labels, self.head_size = in_features, num_labels, head_size
        self.head = DenseClassifier(in_features, head_size, bias) if head_size else None
        self.head_trained = head_trained
        if self.head is not None and not head_trained:
            self.head.requires_grad_(False)
        tail = num_labels - head_size
        self.tail = (
            FixedFanInClassifier(in_features, tail, fan_in, bias, seed=seed, group=group) if tail else None
        )
        self.register_buffer("order", torch.arange(num_labels))
        self.register_buffer("position", torch.arange(num_labels))
        self._fused_loss = True

    @property
    def fused_loss(self) -> bool:  # the parts take the switch (train.fused_loss)
        return self._fused_loss

    @fused_loss.setter
    def fused_loss(self, value: bool) -> None:
        self._fused_loss = value
        for part in self.parts():
            part.fused_loss = value

    @property
    def layer(self):
        """The tail's :class:`~xmc.nn.FixedFanInLinear` (what SET rewires and ``xmc export`` condenses)."""
        if self.tail is None:
            raise AttributeError(
                "this classifier has no fixed fan-in tail (classifier.dense_head = all labels)"
            )
        return self.tail.layer

    def parts(self) -> list[Classifier]:
        return [p for p in (self.head, self.tail) if p is not None]

    def trained_parts(self) -> list[Classifier]:
        """The parts gradient descent trains: both, or the tail alone when the head is frozen."""
        return [p for p in self.parts() if p is not self.head or self.head_trained]

    @torch.no_grad()
    def set_head(self, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None) -> None:
        """Set the head's weights (N, D) and bias (N,) in its own order (position i: label ``order[i]``)."""
        if self.head is None:
            raise ValueError("this classifier has no dense head (classifier.dense_head = 0)")
        weight = torch.as_tensor(np.asarray(weight))
        if weight.shape != self.head.weight.shape:
            raise ValueError(
                f"head weights of shape {tuple(weight.shape)}, expected {tuple(self.head.weight.shape)}"
            )
        self.head.weight.copy_(weight.to(self.head.weight.dtype))
        if self.head.bias is not None and bias is not None:
            self.head.bias.copy_(torch.as_tensor(np.asarray(bias)).to(self.head.bias.dtype))

    @torch.no_grad()
    def set_order(self, order: torch.Tensor | np.ndarray) -> None:
        """Store labels in ``order`` (position -> label id; the first ``head_size`` form the head)."""
        order = torch.as_tensor(np.asarray(order), dtype=torch.int64)
        if order.shape != (self.num_labels,) or not torch.equal(
            torch.sort(order).values, torch.arange(self.num_labels)
        ):
            raise ValueError(f"a label order must be a permutation of 0..{self.num_labels - 1}")
        self.order.copy_(order)
        self.position[order] = torch.arange(self.num_labels, device=self.position.device)

    def split(self, positives: Positives) -> tuple[Positives | None, Positives | None]:
        """The batch's positives as the head's and the tail's own label positions."""
        inner = positives.remap(self.position)
        n = self.head_size
        head = inner.select(0, n) if self.head is not None else None
        tail = inner.select(n, self.num_labels) if self.tail is not None else None
        return head, tail

    def loss(self, h: torch.Tensor, positives: Positives, kind: str = "bce") -> torch.Tensor:
        """Mean ``kind`` loss over all B x L pairs: the parts' means weighted by their label counts."""
        if positives.batch_size != h.shape[0]:
            raise ValueError(f"{positives.batch_size} rows of positives for a batch of {h.shape[0]}")
        if positives.num_labels != self.num_labels:
            raise ValueError(
                f"positives over {positives.num_labels} labels for a {self.num_labels}-label classifier"
            )
        total, trained = None, self.trained_parts()
        for part, pos in zip((self.head, self.tail), self.split(positives), strict=True):
            if part is None or part not in trained:
                continue
            term = part.loss(h, pos, kind) * (part.num_labels / self.num_labels)
            total = term if total is None else total + term
        return total

    def chunk_logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits of internal positions ``start..stop-1`` (the head's first, then the tail's)."""
        n, pieces = self.head_size, []
        if start < n:
            pieces.append(self.head.chunk_logits(h, start, min(stop, n)))
        if stop > n:
            pieces.append(self.tail.chunk_logits(h, max(start, n) - n, stop - n))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def chunk_backward(self, h, grad_logits, start, stop, need_input=True):
        """As :meth:`chunk_logits`, over internal positions: the input gradient and, per entry of
        :meth:`label_parameters`, the gradient of its rows inside the range (empty rows for a part the
        range misses)."""
        n, grad_h, grads, trained = self.head_size, None, [], self.trained_parts()
        ranges = (
            (self.head, start, min(stop, n), 0),
            (self.tail, max(start, n) - n, stop - n, max(start, n) - start),
        )
        for part, a, b, at in ranges:
            if part is None or part not in trained:
                continue
            if a >= b:
                grads += [p[:0] for p in part.label_parameters()]
                continue
            part_h, part_grads = part.chunk_backward(h, grad_logits[:, at : at + b - a], a, b, need_input)
            grads += part_grads
            if part_h is not None:
                grad_h = part_h if grad_h is None else grad_h + part_h
        return grad_h, grads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L) logits in label-id order."""
        inner = self.chunk_logits(h, 0, self.num_labels)
        return inner[:, self.position]

    @torch.no_grad()
    def dense_gradient(self, h, positives, kind, start, stop):
        """Gradient regrowth's dense gradient of the tail's rows ``start..stop-1`` (the tail is what SET
        rewires), of the whole loss (the tail's share of the mean)."""
        _, tail = self.split(positives)
        share = self.tail.num_labels / self.num_labels
        return self.tail.dense_gradient(h, tail, kind, start, stop) * share

    @torch.no_grad()
    def topk(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` over both parts, label ids, ties to the lower id; padded past L as every classifier."""
        scores, ids = [], []
        for part, offset in ((self.head, 0), (self.tail, self.head_size)):
            if part is None:
                continue
            s, i = part.topk(h, min(k, part.num_labels))
            scores.append(s)
            ids.append(torch.where(i >= 0, self.order[(i + offset).clamp_min(0)], -1))
        return topk_merge_lists_torch(torch.cat(scores, 1), torch.cat(ids, 1), k)

    def label_bias(self) -> nn.Parameter | None:
        return None  # two parts in their own order: set_label_bias takes label-id order

    @torch.no_grad()
    def set_label_bias(self, values: torch.Tensor) -> bool:
        """Set every label's bias from ``values`` (L,) in label-id order; False when there is no bias."""
        inner = values[self.order]
        done = False
        for part, offset in ((self.head, 0), (self.tail, self.head_size)):
            bias = None if part is None else part.label_bias()
            if bias is not None:
                bias.copy_(inner[offset : offset + part.num_labels].to(bias.dtype))
                done = True
        return done

    def label_parameters(self) -> list[nn.Parameter]:
        return [p for part in self.trained_parts() for p in part.label_parameters()]

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
        head: int = 0,
        fan_in: int = 32,
        group: int = 1,
        head_trained: bool = True,
    ) -> dict[str, int]:
        """The head's components prefixed ``head_``, the tail's ``tail_``, the two int64 permutation
        buffers, and the loss's transient buffers once: the parts' losses run one after the other. A
        frozen head (``head_trained=False``) holds its weights and bias only."""
        common = dict(
            batch_size=batch_size,
            optimizer=optimizer,
            param_bytes=param_bytes,
            master_weights=master_weights,
            bias=bias,
        )
        parts = {}
        transient = {"logits": 0, "chunk_gradient": 0}
        if head and not head_trained:
            parts["head_weights"] = (head * in_features + (head if bias else 0)) * param_bytes
        elif head:
            dense = DenseClassifier.state_bytes(in_features, head, **common)
            parts.update({f"head_{k}": v for k, v in dense.items() if k not in transient})
            transient = {k: max(transient[k], dense[k]) for k in transient}
        if num_labels - head:
            sparse = FixedFanInClassifier.state_bytes(
                in_features, num_labels - head, fan_in=fan_in, group=group, **common
            )
            parts.update({f"tail_{k}": v for k, v in sparse.items() if k not in transient})
            transient = {k: max(transient[k], sparse[k]) for k in transient}
        parts["label_order"] = 2 * 8 * num_labels
        return parts | transient

    def shape_options(self) -> dict:
        options = {"bias": self.parts()[0].label_bias() is not None, "head": self.head_size}
        if not self.head_trained:
            options["head_trained"] = False
        if self.tail is not None:
            options["fan_in"] = self.tail.fan_in
            options["group"] = self.tail.group
        return options

    def shard(self, rank: int, world: int) -> Classifier:
        raise ValueError(
            "label sharding (train.parallel=labels) does not split a classifier with a dense head or a "
            "semantic label order (classifier.dense_head > 0 or classifier.label_order=semantic) yet: use "
            "train.parallel=data"
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_labels={self.num_labels}, head={self.head_size}"


def frequency_order(Y, head_size: int) -> np.ndarray:
    """Position -> label id: the ``head_size`` most frequent labels of ``Y`` (N, L) first (most frequent
    first, ties to the lower id), then the rest in id order."""
    from xmc.metrics import label_frequencies

    counts = label_frequencies(Y)
    ranked = np.lexsort((np.arange(len(counts)), -counts))  # by count descending, then id
    head = ranked[:head_size]
    tail = np.setdiff1d(np.arange(len(counts)), head, assume_unique=True)
    return np.concatenate([head, tail]).astype(np.int64)


def semantic_order(order: np.ndarray, head_size: int, X, Y, group: int, seed: int = 0) -> np.ndarray:
    """``order`` with its tail (positions ``head_size..``) re-sorted so that labels that share documents
    sit together: balanced hierarchical 2-means (:func:`xmc.clusters.balanced_clusters`) of the tail labels'
    PIFA vectors into ``ceil(T / G)`` leaves of G or fewer labels, in the tree's leaf order. A group of G
    consecutive tail positions then holds one leaf, or the ends of two neighbouring leaves (siblings in the
    tree), instead of G labels that merely have consecutive ids."""
    from xmc.clusters import balanced_clusters, label_representations

    tail = np.asarray(order[head_size:])
    if len(tail) <= 1:
        return np.asarray(order, np.int64)
    leaves = -(-len(tail) // max(group, 1))
    if group <= 1:  # no groups to fill: leaves of 16 labels still put related labels together
        leaves = -(-len(tail) // 16)
    reps = label_representations(X, sp_columns(Y, tail), seed=seed)
    cluster = balanced_clusters(reps, leaves, seed=seed)
    ranked = tail[np.argsort(cluster, kind="stable")]
    return np.concatenate([np.asarray(order[:head_size]), ranked]).astype(np.int64)


def sp_columns(Y, columns: np.ndarray):
    """Columns ``columns`` of a sparse or dense label matrix, as CSR."""
    import scipy.sparse as sp

    return sp.csr_matrix(sp.csc_matrix(Y)[:, columns])
