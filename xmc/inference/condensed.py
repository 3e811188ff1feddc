"""Condensed models: a run's fixed fan-in layers as values + ids, for CPU prediction without training.

``xmc export --run RUN --out DIR`` writes a folder that :func:`xmc.load` reads like a run folder:

- ``config.yaml`` and ``model.json`` (copied; the card gains a ``condensed`` entry with byte counts);
- ``condensed.safetensors``: ``encoder.*`` (the encoder's state), ``intermediate.*`` (``values`` /
  ``ids`` / ``neurons`` / ``bias`` for a fixed fan-in layer, only the surviving neurons after SRigL
  ablation; ``weight`` / ``bias`` for a dense one), and ``classifier.values`` (L, K) float32,
  ``classifier.ids`` (L, K) int16 or int32, ``classifier.bias`` (L,); a classifier with a dense head
  (``classifier.dense_head``) stores its tail there (T rows), and ``classifier.head_weight`` (N, D),
  ``classifier.head_bias`` (N,) and ``classifier.order`` (L,: position -> label id, head first) beside it;
- ``condensed.extra.json`` (the bag-of-words vocabulary) and ``encoder/`` (a transformer's config and
  tokenizer), as in a run folder.

Prediction needs none of the training stack (no optimizer, kernels, Triton or autograd): each label
chunk is a CSR matrix with K entries per row over the same value and id arrays (no copy), multiplied
with the (D, B) representations by SciPy, and merged into a running top-k
(:class:`~xmc.inference.topk.TopKAccumulator`). Memory beyond the model: one (chunk, B) score block and the
(B, k) top-k, so any label count fits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from xmc.encoders import Inputs
from xmc.inference.folder import ModelFolder
from xmc.inference.topk import TopKAccumulator

CONDENSED = "condensed.safetensors"
SCORE_ELEMENTS = 1 << 22  # scores held per label chunk: chunk x B <= this many (16 MiB in fp32)


class SparseRows:
    """``y = x W^T + b`` for a (n, K) fixed fan-in ``values`` / ``ids`` pattern, on SciPy CSR.

    ``neurons`` (optional, (n,) increasing) places row i at output ``neurons[i]`` of an ``out_features``
    wide result (zeros elsewhere); without it the rows are the outputs."""

    def __init__(
        self,
        values: np.ndarray,
        ids: np.ndarray,
        bias: np.ndarray | None,
        in_features: int,
        out_features: int | None = None,
        neurons: np.ndarray | None = None,
    ) -> None:
        self.values = np.ascontiguousarray(values, np.float32)
        self.rows, self.fan_in = values.shape
        # SciPy's index types: int32 (int16 ids are widened once here) while the entries fit, else int64.
        index = np.int32 if (self.rows + 1) * self.fan_in < 2**31 else np.int64
        self.ids = np.ascontiguousarray(ids, index)
        self.bias = None if bias is None else np.asarray(bias, np.float32)
        self.in_features = in_features
        self.out_features = out_features or self.rows
        self.neurons = neurons
        # Row r's entries sit at r*K .. r*K+K-1; a chunk's row pointers are this array's prefix.
        self._indptr = np.arange(0, (self.rows + 1) * self.fan_in, self.fan_in, dtype=index)

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start..stop-1`` as a (stop - start, D) CSR matrix sharing this layer's arrays."""
        a, b = start * self.fan_in, stop * self.fan_in
        shape = (stop - start, self.in_features)
        return sp.csr_matrix(
            (self.values.ravel()[a:b], self.ids.ravel()[a:b], self._indptr[: stop - start + 1]),
            shape=shape,
            copy=False,
        )

    def scores(self, xt: np.ndarray, start: int, stop: int) -> np.ndarray:
        """(stop - start, B) outputs of rows ``start..stop-1`` for inputs given transposed, (D, B)."""
        out = np.asarray(self.block(start, stop) @ xt, dtype=np.float32)
        if self.bias is not None:
            out += self.bias[start:stop, None]
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, D) -> (B, out_features), for a layer small enough to compute whole."""
        rows = self.scores(np.ascontiguousarray(x.T), 0, self.rows).T
        if self.neurons is None:
            return np.ascontiguousarray(rows)
        full = np.zeros((x.shape[0], self.out_features), np.float32)
        full[:, self.neurons] = rows
        return full

    def topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` outputs of each row of ``x`` (B, D): ``(scores float32 (B, k), ids int32 (B, k))``,
        best first, ties to the lower id, in label chunks of ``SCORE_ELEMENTS // B`` rows."""
        batch = x.shape[0]
        xt = np.ascontiguousarray(x.T, np.float32)
        best = TopKAccumulator(batch, k)
        step = max(1, min(self.rows, SCORE_ELEMENTS // max(batch, 1)))
        for start in range(0, self.rows, step):
            stop = min(start + step, self.rows)
            best.update(self.scores(xt, start, stop).T, slice(0, batch), start)
        return best.result()

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.ids.nbytes + (0 if self.bias is None else self.bias.nbytes)


class CondensedPredictor(ModelFolder):
    """A condensed model (see the module docstring) behind the methods of
    :class:`xmc.inference.predictor.Predictor`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        files = ("config.yaml", "model.json", CONDENSED)
        super().__init__(folder, files, "write the folder with `xmc export`")
        tensors = load_file(str(self.run_dir / CONDENSED))
        state: dict = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        if (self.run_dir / "condensed.extra.json").exists():
            state.update(json.loads((self.run_dir / "condensed.extra.json").read_text()))
        self.encoder.load_state_dict(state)
        self.encoder.eval()
        width = self.encoder.out_features
        self.intermediate = None
        if "intermediate.values" in tensors or "intermediate.weight" in tensors:
            self.intermediate = _layer(tensors, "intermediate", width, self.config.classifier.intermediate)
            width = self.config.classifier.intermediate
        self.classifier = _layer(tensors, "classifier", width, self.card["num_labels"])
        if "classifier.order" in tensors:  # a dense head and a fixed fan-in tail in their own label order
            self.classifier = HeadTailRows(tensors, self.classifier)

    @torch.inference_mode()
    def represent(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """(B, D) float32 inputs of the classifier."""
        h = self.encoder(batch).float().numpy()
        return h if self.intermediate is None else self.intermediate(h)

    def _topk(self, inputs: Inputs, k: int, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        batch_size = batch_size or self.config.train.eval_batch_size
        scores = np.empty((len(inputs), k), np.float32)
        ids = np.empty((len(inputs), k), np.int32)
        for start in range(0, len(inputs), batch_size):
            rows = np.arange(start, min(start + batch_size, len(inputs)))
            scores[rows], ids[rows] = self.classifier.topk(self.represent(inputs.batch(rows)), k)
        return scores, ids


class HeadTailRows:
    """A condensed :class:`~xmc.classifiers.head_tail.HeadTailClassifier`: the dense head's scores, the
    tail's :class:`SparseRows`, each part's top-k mapped to label ids through ``classifier.order`` and the
    two merged (ties to the lower label id, as in training)."""

    def __init__(self, tensors: dict, tail: SparseRows) -> None:
        self.order = tensors["classifier.order"].numpy().astype(np.int64)
        weight = tensors.get("classifier.head_weight")
        self.head_weight = None if weight is None else weight.numpy()
        bias = tensors.get("classifier.head_bias")
        self.head_bias = None if bias is None else bias.numpy()
        self.head_size = 0 if weight is None else weight.shape[0]
        self.tail = tail

    def topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from xmc.inference.topk import topk_merge_lists_torch

        scores, ids = [], []
        if self.head_size:
            best = TopKAccumulator(x.shape[0], min(k, self.head_size))
            head = x @ self.head_weight.T + (0 if self.head_bias is None else self.head_bias)
            best.update(head, slice(0, x.shape[0]), 0)
            s, i = best.result()
            scores.append(s)
            ids.append(np.where(i >= 0, self.order[np.maximum(i, 0)], -1))
        s, i = self.tail.topk(x, min(k, self.tail.rows))
        scores.append(s)
        ids.append(np.where(i >= 0, self.order[np.maximum(i, 0) + self.head_size], -1))
        merged = topk_merge_lists_torch(
            torch.from_numpy(np.concatenate(scores, 1)), torch.from_numpy(np.concatenate(ids, 1)), k
        )
        return merged[0].numpy(), merged[1].numpy().astype(np.int32)

    @property
    def nbytes(self) -> int:
        head = 0 if self.head_weight is None else self.head_weight.nbytes
        head += 0 if self.head_bias is None else self.head_bias.nbytes
        return head + self.tail.nbytes + self.order.nbytes


def _layer(tensors: dict, name: str, in_features: int, out_features: int):
    bias = tensors.get(f"{name}.bias")
    bias = None if bias is None else bias.numpy()
    if f"{name}.weight" in tensors:  # dense intermediate layer
        weight = tensors[f"{name}.weight"].numpy()
        return lambda x: x @ weight.T + (0 if bias is None else bias)
    neurons = tensors.get(f"{name}.neurons")
    return SparseRows(
        tensors[f"{name}.values"].numpy(),
        tensors[f"{name}.ids"].numpy(),
        bias,
        in_features,
        out_features,
        None if neurons is None else neurons.numpy(),
    )
