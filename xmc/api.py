"""Python API: load a finished run and predict labels for new documents.

    import xmc
    model = xmc.load("runs/20261123-default")
    model.predict(["Council regulation on the common organisation of the market in wine"], k=5)
    # -> [[("wine", 7.1), ("common agricultural policy", 5.3), ...]]

A run folder is self-contained: ``config.yaml``, ``model.json`` and ``best.safetensors`` (with the
bag-of-words vocabulary or, for transformers, ``encoder/`` holding the model config and tokenizer).
``xmc.load`` also reads the condensed folders ``xmc export`` writes (:mod:`xmc.condensed`): those
predict on the CPU without importing the training stack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xmc.config import load_config
from xmc.encoders import FeaturesInputs, Inputs, SplitSource, build_token_inputs


class Predictor:
    """A trained model with what it needs to turn raw inputs into top-k labels."""

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto") -> None:
        from xmc.condensed import encoder_from_card
        from xmc.train.checkpoint import load_model
        from xmc.train.run import build_model, resolve_device, resolve_precision

        run = Path(run_dir)
        for name in ("config.yaml", "model.json", "best.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(
                    f"{run}: {name} missing; is this the folder of a finished xmc train run?"
                )
        self.run_dir = run
        self.config = load_config(run / "config.yaml")
        self.card = json.loads((run / "model.json").read_text())
        self.label_names: list[str] | None = self.card.get("label_names")
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.config.train.precision, self.device)
        encoder, self.tokenizer = encoder_from_card(self.config, self.card, run)
        clusters = None
        if self.card.get("meta_clusters"):
            clusters = np.zeros(self.card["num_labels"], np.int64)  # overwritten by the saved buffer
        self.model = build_model(self.config, encoder, self.card["num_labels"], clusters)
        load_model(self.model, run / "best.safetensors")
        self.model.to(self.device).eval()

    def inputs(self, source: SplitSource, progress: bool = False) -> Inputs:
        """Encoder inputs for new documents (raw text, bag-of-words counts or embeddings)."""
        kind = self.config.encoder.type
        if kind == "bow":
            texts = source.texts() if source.texts is not None else None
            return self.model.encoder.inputs_for(X=source.X, texts=texts)
        if kind == "features":
            return FeaturesInputs(source.features)
        return build_token_inputs(source, self.tokenizer, self.config.encoder.max_length, progress)

    def topk(self, inputs: Inputs, k: int, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (N, k), ids int32 (N, k))`` best first over all labels."""
        batch_size = batch_size or self.config.train.eval_batch_size
        from xmc.train.evaluation import predict_rows

        rows = np.arange(len(inputs))
        return predict_rows(self.model, inputs, rows, self.device, self.precision, batch_size, k)

    def predict(self, texts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """Top ``k`` (label name, score) pairs for each raw text (label ids as names when unnamed)."""
        if self.config.encoder.type == "features":
            raise ValueError(
                "this model reads precomputed embeddings: compute them with `xmc embed`, then topk()"
            )
        texts = list(texts)
        return top_pairs(self, *self.topk(self.inputs(SplitSource(texts=lambda: texts)), k))

    def label_name(self, label: int) -> str:
        return self.label_names[label] if self.label_names else str(label)


def top_pairs(predictor, scores: np.ndarray, ids: np.ndarray) -> list[list[tuple[str, float]]]:
    """Per document, the (label name, score) pairs of its top-k (padding dropped)."""
    return [
        [(predictor.label_name(int(i)), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
        for srow, irow in zip(scores, ids, strict=True)
    ]


def load(run_dir: str | os.PathLike, device: str = "auto"):
    """Load the best model of a finished run (:class:`Predictor`), or a condensed folder written by
    ``xmc export`` (:class:`~xmc.condensed.CondensedPredictor`, CPU only)."""
    if (Path(run_dir) / "condensed.safetensors").exists():
        from xmc.condensed import CondensedPredictor

        if device == "cuda":
            raise ValueError(f"{run_dir} is a condensed model: it predicts on the CPU (use --device cpu)")
        return CondensedPredictor(run_dir)
    return Predictor(run_dir, device)
