"""The auxiliary meta-classifier: a small dense classifier over label clusters.

Sparse output layers pass little gradient back into the encoder early in training. SPARTEX adds a
dense head over K label clusters (K ~ L / 64) whose targets are "does the document have a label in
cluster c", and trains on

    loss = (1 - lam) * main + lam * meta,   lam = lam0 * (1 + cos(pi * t / cutoff)) / 2 for t < cutoff,

with t the fractional epochs done; from the cut-off epoch on lam is 0 and the head is not evaluated.
The head reads the same input ``h`` as the main classifier. Clusters come from
:func:`xmc.clusters.cluster_labels`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmc.classifiers.dense import DenseClassifier
from xmc.losses import Positives


def cluster_count(num_labels: int) -> int:
    """The number of label clusters for L labels: L / 64 rounded to a power of two (in log scale), at
    least 2. One rule for every shipped config, anchored on SPARTEX's one published count (2,048 clusters
    for LF-AmazonTitles-131K's 131,073 labels)."""
    return max(2, 2 ** round(math.log2(max(num_labels, 1) / 64)))


def meta_positives(positives: Positives, cluster_of_label: torch.Tensor, num_clusters: int) -> Positives:
    """Each document's positive clusters, deduplicated and sorted within the row.

    Args:
        positives: CSR positives over L labels (B rows).
        cluster_of_label: int64 (L,), the cluster of each label, in ``0..num_clusters-1``.
        num_clusters: K.

    Returns:
        Positives over K clusters, on the device of ``positives``.
    """
    if cluster_of_label.numel() != positives.num_labels:
        raise ValueError(
            f"cluster_of_label has {cluster_of_label.numel()} entries for {positives.num_labels} labels"
        )
    device = positives.indices.device
    clusters = cluster_of_label.to(device)[positives.indices]
    # One int64 key per (row, cluster) pair: torch.unique sorts and deduplicates all rows at once,
    # row-major, so the result is already CSR-ordered. B * K stays far below 2**63.
    keys = torch.unique(positives.rows() * num_clusters + clusters, sorted=True)
    rows, cluster_ids = keys // num_clusters, keys % num_clusters
    indptr = torch.zeros(positives.batch_size + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.bincount(rows, minlength=positives.batch_size), 0, out=indptr[1:])
    return Positives(indptr, cluster_ids, num_clusters)


def meta_weight(epoch_progress: float, lam0: float, cutoff_epoch: float) -> float:
    """The meta loss weight ``lam`` after ``epoch_progress`` (fractional) epochs: ``lam0`` at 0,
    cosine-decayed to 0 at ``cutoff_epoch``, 0 from then on (and always 0 when ``cutoff_epoch <= 0``)."""
    if cutoff_epoch <= 0 or epoch_progress >= cutoff_epoch:
        return 0.0
    t = max(epoch_progress, 0.0)
    return lam0 * 0.5 * (1.0 + math.cos(math.pi * t / cutoff_epoch))


class MetaHead(nn.Module):
    """A dense classifier over label clusters, trained on the clusters of each document's labels.

    Holds ``cluster_of_label`` as a buffer (int64 (L,), saved with the model) and the dense
    ``classifier`` (K outputs, weight (K, D)); its loss is the chunked dense loss of the classifier
    on :func:`meta_positives`.
    """

    cluster_of_label: torch.Tensor

    def __init__(
        self,
        in_features: int,
        cluster_of_label: torch.Tensor,
        num_clusters: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``cluster_of_label``: int64 (L,) in ``0..K-1``; ``num_clusters`` K defaults to its max + 1."""
        super().__init__()
        cluster_of_label = torch.as_tensor(cluster_of_label, dtype=torch.int64, device=device)
        if cluster_of_label.dim() != 1:
            raise ValueError(f"cluster_of_label must be 1-D (L,), got shape {tuple(cluster_of_label.shape)}")
        if num_clusters is None:
            num_clusters = int(cluster_of_label.max()) + 1 if cluster_of_label.numel() else 1
        if cluster_of_label.numel() and (
            cluster_of_label.min() < 0 or cluster_of_label.max() >= num_clusters
        ):
            raise ValueError(f"cluster ids must lie in 0..{num_clusters - 1}")
        self.num_clusters = num_clusters
        self.register_buffer("cluster_of_label", cluster_of_label)
        self.classifier = DenseClassifier(in_features, num_clusters, bias, device, dtype)

    @property
    def num_labels(self) -> int:
        return self.cluster_of_label.numel()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K) cluster logits."""
        return self.classifier(h)

    def loss(self, h: torch.Tensor, positives: Positives, kind: str = "bce") -> torch.Tensor:
        """Mean ``kind`` loss over all B x K (document, cluster) pairs; ``positives`` are over L labels."""
        return self.classifier.loss(
            h, meta_positives(positives, self.cluster_of_label, self.num_clusters), kind
        )

    def mixed_loss(
        self, main: torch.Tensor, h: torch.Tensor, positives: Positives, lam: float, kind: str = "bce"
    ) -> torch.Tensor:
        """``(1 - lam) * main + lam * meta``; returns ``main`` untouched (no meta forward) when lam is 0."""
        if lam == 0:
            return main
        return (1 - lam) * main + lam * self.loss(h, positives, kind)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, num_clusters={self.num_clusters}"
