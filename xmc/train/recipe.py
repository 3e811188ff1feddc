"""A training run's fixed parts in one object: what the loop, its evaluations and the run's report share.

:func:`xmc.train.loop.train` takes a :class:`Recipe` (and whether to resume) instead of a dozen
arguments; its methods score a split the same way for dev evaluations during training and the final
report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xmc.config import Config
from xmc.train.evaluation import evaluate_split, predict_split
from xmc.train.parallel import Parallel


@dataclass
class Recipe:
    """Everything a run trains and evaluates with; nothing in it changes while it trains.

    ``inputs`` maps a split's source name to its encoder inputs; ``precision`` is resolved (``no``,
    ``bf16`` or ``fp16``, :func:`xmc.runtime.resolve_precision`); ``parallel`` is this process's part of a
    multi-process run (default: a single process); ``meta_weight(epochs)`` is the meta head's loss weight
    after ``epochs`` (fractional) epochs (None: no meta head); ``step_hook(model, step, optimizers,
    scaler)`` runs after each accumulation window's backward, before the optimizer step (tests inject
    faults with it)."""

    config: Config
    model: torch.nn.Module
    data: object  # xmc.train.data.LoadedData
    inputs: dict
    run_dir: Path
    device: torch.device
    precision: str
    parallel: Parallel = field(default_factory=Parallel)
    meta_weight: Callable[[float], float] | None = None
    progress: bool = True
    step_hook: Callable | None = None

    def _scoring(self) -> tuple:
        """The arguments after ``(model, split)`` that scoring a split takes (xmc.train.evaluation)."""
        return self.inputs, self.device, self.precision, self.config.train.eval_batch_size

    def predict(self, split, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, ids)`` of ``split``'s documents (every rank gets the whole)."""
        return predict_split(self.model, split, *self._scoring(), k, self.parallel)

    def evaluate(self, split, inv_prop: np.ndarray | None = None) -> dict:
        """The metrics of :func:`xmc.metrics.evaluate` (k = 1, 3, 5) on ``split``."""
        return evaluate_split(self.model, split, *self._scoring(), inv_prop, parallel=self.parallel)
