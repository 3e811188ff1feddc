"""The XMC model: encoder -> optional intermediate layer -> classifier (+ optional meta head).

Its assembly from a config (:func:`build_model`, shared by training, prediction and the memory planner's
measurement) and its weights on disk (:func:`save_model`, :func:`load_model`: safetensors, written
atomically, with modules' extra state such as a bag-of-words vocabulary as JSON beside them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from xmc.classifiers import Classifier, DenseClassifier, FixedFanInClassifier
from xmc.config import ClassifierConfig, Config
from xmc.data.atomic import atomic_open
from xmc.losses import Positives

log = logging.getLogger(__name__)


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
    fixed_fanin = config.type == "fixed_fanin"
    if (config.dense_head or config.label_order != "id") and not fixed_fanin:
        # Like fan_in, ids and set: fixed fan-in options that another type ignores (the default config's
        # head must not stop `xmc train classifier.type=dense`), said once in the log.
        log.warning(
            "classifier.type=%s ignores the fixed fan-in options classifier.dense_head=%d and label_order=%s "
            "(and head_fit): they shape a fixed fan-in classifier's head and tail",
            config.type,
            config.dense_head,
            config.label_order,
        )
    if fixed_fanin and config.head_fit == "svm":
        if not config.dense_head:
            raise ValueError(
                "classifier.head_fit=svm fits the dense head's labels by SVMs, but classifier.dense_head=0: "
                "give the head's size, e.g. classifier.dense_head=200 (the most frequent labels)"
            )
        if config.dense_head >= num_labels:
            raise ValueError(
                f"classifier.head_fit=svm with classifier.dense_head={config.dense_head} of {num_labels} "
                "labels leaves no tail for gradient descent to train: give a smaller head"
            )
        if not config.head_c > 0:
            raise ValueError(f"classifier.head_c must be positive (the head SVMs' C), got {config.head_c}")
    if config.type == "dense":
        return DenseClassifier(in_features, num_labels, bias=config.bias)
    if config.type == "fixed_fanin":
        if config.fan_in > in_features:
            raise ValueError(
                f"classifier.fan_in={config.fan_in} exceeds the classifier's input width {in_features}; "
                "lower it or widen the encoder / intermediate layer"
            )
        if config.dense_head or config.label_order != "id":
            if config.dense_head > num_labels:
                raise ValueError(
                    f"classifier.dense_head={config.dense_head} exceeds the {num_labels} labels: give at "
                    f"most {num_labels} (all labels dense) or use classifier.type=dense"
                )
            from xmc.classifiers.head_tail import HeadTailClassifier

            return HeadTailClassifier(
                in_features,
                num_labels,
                config.dense_head,
                config.fan_in,
                bias=config.bias,
                seed=seed,
                group=config.fan_in_group,
                head_trained=config.head_fit == "sgd",
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
        return [p for p in encoder_side if p.requires_grad], [p for p in classifier_side if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        counts = {"encoder": sum(p.numel() for p in self.encoder.parameters())}
        counts["intermediate"] = (
            sum(p.numel() for p in self.intermediate.parameters()) if self.intermediate else 0
        )
        counts["classifier"] = sum(p.numel() for p in self.classifier.parameters())
        counts["meta"] = sum(p.numel() for p in self.meta.parameters()) if self.meta else 0
        return counts

    def training_state_bytes(self, optimizer: str = "adamw") -> int:
        """Bytes the classifier side holds through training: the classifier's weights, ids (and their
        column view), gradients and optimizer state (its ``memory()`` without the loss's transient
        buffers), plus the intermediate layer's and the meta head's parameters, gradients, optimizer state
        and buffers. ``optimizer``: the classifier side's (adamw or sgd); bf16 classifier state counts
        its bf16 weights and moments."""
        from xmc.memory.bytes import optimizer_state_bytes

        bf16 = next(self.classifier.parameters()).dtype == torch.bfloat16
        if bf16 and optimizer == "adamw":
            optimizer = "adamw-bf16"
        parts = self.classifier.memory(optimizer=optimizer)
        transient = ("logits", "chunk_gradient", "group_products", "workspace")
        total = sum(v for k, v in parts.items() if not k.endswith(transient))
        for part in (self.intermediate, self.meta):
            if part is None:
                continue
            for p in part.parameters():
                total += 2 * p.numel() * p.element_size() + optimizer_state_bytes(p.numel(), optimizer)
            total += sum(b.numel() * b.element_size() for b in part.buffers())
        return total

    def classifier_bytes(self) -> int:
        """Bytes of everything on the classifier side (weights, ids, bias, intermediate, meta head)."""
        tensors = list(self.classifier.parameters()) + list(self.classifier.buffers())
        for part in (self.intermediate, self.meta):
            if part is not None:
                tensors += list(part.parameters()) + list(part.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def build_model(config: Config, encoder, num_labels: int, clusters: np.ndarray | None = None) -> XMCModel:
    """The model ``config`` describes over ``encoder`` and ``num_labels`` labels, freshly initialized (seeded
    by ``config.seed``); ``clusters`` (each label's cluster id) adds the meta head. Training, prediction and
    the memory planner's measurement all build their model here."""
    width = encoder.out_features
    intermediate = None
    if config.classifier.intermediate:
        intermediate = _intermediate(config, width)
        width = config.classifier.intermediate
    classifier = build_classifier(config.classifier, width, num_labels, config.seed)
    classifier.fused_loss = config.train.fused_loss
    meta = None
    if clusters is not None:
        from xmc.classifiers.meta import MetaHead

        meta = MetaHead(width, torch.from_numpy(clusters), config.classifier.meta.clusters)
    if config.train.classifier_state == "bf16":  # the classifier side's weights live in bf16 (xmc.optim)
        if config.classifier.type == "rps":
            raise ValueError("train.classifier_state=bf16 serves dense and fixed_fanin classifiers, not rps")
        classifier.to(torch.bfloat16)
        if meta is not None:
            meta.to(torch.bfloat16)
    return XMCModel(encoder, classifier, intermediate, meta)


def _intermediate(config: Config, width: int) -> torch.nn.Module:
    """The layer between encoder and classifier: dense, or fixed fan-in (rewired, SRigL ablation)."""
    cfg = config.classifier
    if not cfg.intermediate_fan_in:
        return torch.nn.Linear(width, cfg.intermediate)
    if cfg.intermediate_fan_in > width:
        raise ValueError(
            f"classifier.intermediate_fan_in={cfg.intermediate_fan_in} exceeds the encoder width {width}"
        )
    if cfg.set.gamma and (not cfg.set.enabled or cfg.set.regrow != "gradient"):
        raise ValueError(
            "classifier.set.gamma > 0 (neuron ablation) needs set.enabled and set.regrow=gradient"
        )
    from xmc.nn import AblatableFixedFanInLinear

    return AblatableFixedFanInLinear(width, cfg.intermediate, cfg.intermediate_fan_in, seed=config.seed + 1)


class CheckpointError(ValueError):
    """A saved model or checkpoint that cannot be read (truncated, damaged, or not written by xmc)."""


def damaged(path: Path, err: BaseException, fix: str) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path}: cannot be read, damaged or not written by xmc ({reason[:200]}); {fix}")


def _extra_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".safetensors") + ".extra.json")


def save_model(model: torch.nn.Module | dict[str, Any], path: str | os.PathLike) -> None:
    """``model.state_dict()`` (or a state dict given as is, e.g. label shards gathered whole):
    tensors as safetensors, and modules' extra state (e.g. a bag-of-words vocabulary) as JSON beside it
    (``<name>.extra.json``); each file written atomically."""
    path = Path(path)
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    if extra:
        with atomic_open(_extra_path(path)) as handle:
            handle.write(json.dumps(extra).encode())
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_model(model: torch.nn.Module, path: str | os.PathLike, rows: dict[str, slice] | None = None) -> None:
    """Load weights saved by :func:`save_model`. ``rows`` maps state-dict names to the rows this
    process holds (a label shard loading a whole checkpoint): only those rows are read from disk."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no model weights here (is this a finished or checkpointed run folder?)"
        )
    try:
        if rows:
            with safe_open(str(path), framework="pt") as handle:
                state: dict[str, Any] = {
                    key: handle.get_slice(key)[rows[key]] if key in rows else handle.get_tensor(key)
                    for key in handle.keys()
                }
        else:
            state = dict(load_file(str(path)))
        if _extra_path(path).exists():
            state.update(json.loads(_extra_path(path).read_text()))
    except (OSError, ValueError) as err:
        raise damaged(path, err, "train again, or resume from a run folder's checkpoint") from None
    except Exception as err:  # safetensors' own error type, which it does not export
        if type(err).__name__ != "SafetensorError":
            raise
        raise damaged(path, err, "train again, or resume from a run folder's checkpoint") from None
    model.load_state_dict(state)
