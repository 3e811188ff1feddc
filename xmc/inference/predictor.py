"""Python API: load a finished run and predict labels for new documents.

    import xmc
    model = xmc.load("runs/20261123-default")
    model.predict(["Council regulation on the common organisation of the market in wine"], k=5)
    # -> [[("wine", 7.1), ("common agricultural policy", 5.3), ...]]

A run folder is self-contained: ``config.yaml``, ``model.json`` and ``best.safetensors`` (with the
bag-of-words vocabulary or, for transformers, ``encoder/`` holding the model config and tokenizer).
``xmc.load`` also reads the condensed folders ``xmc export`` writes (:mod:`xmc.inference.condensed`): those
predict on the CPU without importing the training stack.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xmc.encoders import Inputs
from xmc.inference.folder import ModelFolder


class Predictor(ModelFolder):
    """A trained model with what it needs to turn raw inputs into top-k labels."""

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto") -> None:
        from xmc.model import build_model, load_model
        from xmc.runtime import resolve_device, resolve_precision

        files = ("config.yaml", "model.json", "best.safetensors")
        super().__init__(run_dir, files, "is this the folder of a finished xmc train run?")
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.config.train.precision, self.device)
        clusters = None
        if self.card.get("meta_clusters"):
            clusters = np.zeros(self.card["num_labels"], np.int64)  # overwritten by the saved buffer
        self.model = build_model(self.config, self.encoder, self.card["num_labels"], clusters)
        load_model(self.model, self.run_dir / "best.safetensors")
        self.model.to(self.device).eval()

    def _topk(self, inputs: Inputs, k: int, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        from xmc.inference.predict import predict_rows

        batch_size = batch_size or self.config.train.eval_batch_size
        rows = np.arange(len(inputs))
        return predict_rows(self.model, inputs, rows, self.device, self.precision, batch_size, k)


def load(run_dir: str | os.PathLike, device: str = "auto"):
    """Load the best model of a finished run (:class:`Predictor`), or a condensed folder written by
    ``xmc export`` (:class:`~xmc.inference.condensed.CondensedPredictor`, CPU only)."""
    if (Path(run_dir) / "condensed.safetensors").exists():
        from xmc.inference.condensed import CondensedPredictor

        if device == "cuda":
            raise ValueError(f"{run_dir} is a condensed model: it predicts on the CPU (use --device cpu)")
        return CondensedPredictor(run_dir)
    return Predictor(run_dir, device)
