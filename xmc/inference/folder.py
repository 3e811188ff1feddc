"""A model folder as prediction reads it: the config, the model card, the encoder and its tokenizer.

Run folders (:class:`~xmc.inference.predictor.Predictor`) and condensed folders
(:class:`~xmc.inference.condensed.CondensedPredictor`) share this; each loads its own weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from xmc.config import load_config
from xmc.data.source import SplitSource
from xmc.encoders import FeaturesInputs, Inputs, build_token_inputs


class ModelFolder:
    """What a run folder and a condensed folder share: the config, the model card, the encoder (built,
    weights not loaded) and its tokenizer, and turning raw inputs into top-k label names. Subclasses load
    the weights and define :meth:`topk`."""

    def __init__(self, folder: str | os.PathLike, files: tuple[str, ...], hint: str) -> None:
        folder = Path(folder)
        for name in files:
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder}: {name} missing; {hint}")
        self.run_dir = folder
        self.config = load_config(folder / "config.yaml")
        self.card = json.loads((folder / "model.json").read_text())
        self.label_names: list[str] | None = self.card.get("label_names")
        self.encoder, self.tokenizer = encoder_from_card(self.config, self.card, folder)

    def inputs(self, source: SplitSource, progress: bool = False) -> Inputs:
        """Encoder inputs for new documents (raw text, bag-of-words counts or embeddings)."""
        kind = self.config.encoder.type
        if kind == "bow":
            texts = source.texts() if source.texts is not None else None
            return self.encoder.inputs_for(X=source.X, texts=texts)
        if kind == "features":
            return FeaturesInputs(source.features)
        return build_token_inputs(source, self.tokenizer, self.config.encoder.max_length, progress)

    @property
    def num_labels(self) -> int:
        return int(self.card["num_labels"])

    def topk(self, inputs: Inputs, k: int, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (N, w), ids int32 (N, w))`` best first over all labels, ``w = min(k, L)``: a
        k above the label count costs what k = L costs."""
        return self._topk(inputs, self.width(k), batch_size)

    def _topk(self, inputs: Inputs, k: int, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def width(self, k: int) -> int:
        """The number of labels a top-``k`` holds: ``min(k, L)``; ``k`` must be a positive integer."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be a positive integer, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return min(int(k), self.num_labels)

    def predict(self, texts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """Top ``k`` (label name, score) pairs for each raw text (label ids as names when unnamed);
        ``texts`` is a list (or other sequence) of strings, one per document."""
        if self.config.encoder.type == "features":
            raise ValueError(
                "this model reads precomputed embeddings: compute them with `xmc embed`, then topk()"
            )
        texts = _documents(texts)
        scores, ids = self.topk(self.inputs(SplitSource(texts=lambda: texts)), k)
        return [
            [(self.label_name(int(i)), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def label_name(self, label: int) -> str:
        return self.label_names[label] if self.label_names else str(label)


def _documents(texts) -> list[str]:
    """``texts`` as a list of strings, or a TypeError that says what was expected."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "predict() takes a list of documents, got a single string: wrap it, predict([text], k)"
        )
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"predict() takes a list of strings, got {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"predict(): document {i} is {type(text).__name__} ({text!r}), not a string")
    return texts


def encoder_from_card(config, card: dict, folder: Path) -> tuple[torch.nn.Module, object | None]:
    """``(encoder, tokenizer)`` of a run (or condensed) folder, built without the training data; the
    weights are not loaded; the tokenizer is None but for a transformer."""
    cfg = config.encoder
    if cfg.type == "bow":
        from xmc.encoders import BowEncoder

        return BowEncoder(card["encoder_num_features"], cfg.dim, cfg.dropout, cfg.activation), None
    if cfg.type == "features":
        from xmc.encoders import FeaturesEncoder

        return FeaturesEncoder(card["encoder_out_features"], cfg.dropout), None
    from transformers import AutoConfig, AutoTokenizer

    from xmc.encoders import TransformerEncoder

    hf_config = AutoConfig.from_pretrained(folder / "encoder", local_files_only=True)
    encoder = TransformerEncoder.from_config(hf_config, cfg.pooling, cfg.dropout)
    return encoder, AutoTokenizer.from_pretrained(folder / "encoder", local_files_only=True)
