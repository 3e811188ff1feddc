"""The XMC model: encoder -> optional intermediate layer -> classifier (+ optional meta head)."""

from __future__ import annotations

import torch
from torch import nn

from xmc.classifiers import Classifier, DenseClassifier, FixedFanInClassifier
from xmc.config import ClassifierConfig
from xmc.losses import Positives


def build_classifier(config: ClassifierConfig, in_features: int, num_labels: int, seed: int) -> Classifier:
    if config.fan_in_group < 1:
        raise ValueError(
            f"classifier.fan_in_group must be at least 1 (1 = no groups), got {config.fan_in_group}"
        )
    if config.fan_in_group > 1 and config.type != "fixed_fanin":
        raise ValueError(
            f"classifier.fan_in_group={config.fan_in_group} groups the ids of a fixed fan-in classifier, but "
            f"classifier.type={config.type}: set classifier.type=fixed_fanin or classifier.fan_in_group=1"
        )
    if config.type == "dense":
        return DenseClassifier(in_features, num_labels, bias=config.bias)
    if config.type == "fixed_fanin":
        if config.fan_in > in_features:
            raise ValueError(
                f"classifier.fan_in={config.fan_in} exceeds the classifier's input width {in_features}; "
                "lower it or widen the encoder / intermediate layer"
            )
        return FixedFanInClassifier(
            in_features, num_labels, config.fan_in, bias=config.bias, seed=seed, group=config.fan_in_group
        )
    if config.type == "rps":
        from xmc.classifiers.rps import RPSClassifier

        rps = config.rps
        if rps.bytes and rps.bytes < 4:
            raise ValueError(f"classifier.rps.bytes={rps.bytes} holds no slot: give at least 4")
        if not rps.bytes and rps.compression <= 0:
            raise ValueError(f"classifier.rps.compression must be positive, got {rps.compression}")
        return RPSClassifier(
            in_features,
            num_labels,
            method=rps.method,
            size=rps.bytes // 4 if rps.bytes else None,
            compression=None if rps.bytes else rps.compression,
            init_scale=rps.init_scale or None,
            array_std=rps.array_std or None,
            sign=rps.sign,
            stable_grad=rps.stable_grad,
            bias=config.bias,
            seed=seed,
        )
    raise ValueError(f"classifier.type={config.type!r} is unknown: choose dense, fixed_fanin or rps")


class XMCModel(nn.Module):
    """``encoder`` (batch -> (B, E)), ``intermediate`` ((B, E) -> (B, D), linear, no activation, as
    SPARTEX), ``classifier`` over L labels and an optional ``meta`` head over label clusters."""

    def __init__(
        self,
        encoder: nn.Module,
        classifier: Classifier,
        intermediate: nn.Module | None = None,
        meta: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.intermediate, self.classifier, self.meta = encoder, intermediate, classifier, meta

    def represent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) input of the classifier."""
        h = self.encoder(batch)
        return h if self.intermediate is None else self.intermediate(h)

    def loss(self, batch, positives: Positives, kind: str, meta_weight: float = 0.0) -> torch.Tensor:
        """``(1 - lam) * main + lam * meta`` (just the main loss while lam is 0 or there is no head)."""
        h = self.represent(batch)
        main = self.classifier.loss(h, positives, kind)
        if self.meta is None or meta_weight <= 0:
            return main
        # The anchors train the meta head with BCE whatever the main loss.
        return (1 - meta_weight) * main + meta_weight * self.meta.loss(h, positives, "bce")

    def forward(self, batch, positives: Positives, kind: str, meta_weight: float = 0.0) -> torch.Tensor:
        """:meth:`loss`: the forward ``DistributedDataParallel`` wraps, so it sees every parameter the
        loss uses (the classifiers' fused, chunked loss functions included)."""
        return self.loss(batch, positives, kind, meta_weight)

    @torch.no_grad()
    def topk(self, batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.topk(self.represent(batch), k)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder side: encoder + intermediate, classifier side: classifier + meta head)."""
        encoder_side = list(self.encoder.parameters())
        if self.intermediate is not None:
            encoder_side += list(self.intermediate.parameters())
        classifier_side = list(self.classifier.parameters())
        if self.meta is not None:
            classifier_side += list(self.meta.parameters())
        return [p for p in encoder_side if p.requires_grad], classifier_side

    def parameter_counts(self) -> dict[str, int]:
        counts = {"encoder": sum(p.numel() for p in self.encoder.parameters())}
        counts["intermediate"] = (
            sum(p.numel() for p in self.intermediate.parameters()) if self.intermediate else 0
        )
        counts["classifier"] = sum(p.numel() for p in self.classifier.parameters())
        counts["meta"] = sum(p.numel() for p in self.meta.parameters()) if self.meta else 0
        return counts

    def classifier_bytes(self) -> int:
        """Bytes of everything on the classifier side (weights, ids, bias, intermediate, meta head)."""
        tensors = list(self.classifier.parameters()) + list(self.classifier.buffers())
        for part in (self.intermediate, self.meta):
            if part is not None:
                tensors += list(part.parameters()) + list(part.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
