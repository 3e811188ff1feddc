"""Shared by the re-ranking probes (``probe_centroid_rerank.py``, ``probe_svm_head.py``): a finished run with
its carved and test splits, the peer's TF-IDF fitted over the run's own training rows, the run's top
candidates per split, and one re-ranking scored and printed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from common import PEER_TFIDF

from xmc.inference.predict import predict_rows
from xmc.inference.predictor import Predictor
from xmc.metrics import evaluate
from xmc.train.data import LoadedData, load_data


@dataclass
class ProbeRun:
    predictor: Predictor
    data: LoadedData
    texts: dict[str, list[str]]
    vectorizer: object  # a fitted scikit-learn TfidfVectorizer
    X_train: sp.csr_matrix  # the peer's TF-IDF of the run's training rows

    def tfidf(self, name: str) -> sp.csr_matrix:
        """The peer's TF-IDF rows of split ``name``."""
        split = self.data.splits[name]
        return self.vectorizer.transform([self.texts[split.source][r] for r in split.rows])

    def candidates(self, name: str, top: int) -> tuple[np.ndarray, np.ndarray]:
        """The run's ``top`` best ``(scores, label ids)`` per document of split ``name``, best first."""
        p, split = self.predictor, self.data.splits[name]
        inputs = p.inputs(self.data.sources[split.source])
        scores, ids = predict_rows(p.model, inputs, split.rows, p.device, p.precision, 256, top)
        return np.asarray(scores, np.float32), np.asarray(ids)


def load_probe_run(run_dir: str) -> ProbeRun:
    """Load a finished ``xmc train`` run (it needs a carved split, ``dev``, and a ``test`` split) and fit the
    peer's TF-IDF over its training rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    predictor = Predictor(run_dir, device="cpu")
    data = load_data(predictor.config.data, predictor.config.seed)
    if "dev" not in data.splits or "test" not in data.splits:
        raise SystemExit(f"{run_dir}: the probe needs a run with a carved (dev) and a test split")
    texts = {name: list(source.texts()) for name, source in data.sources.items()}
    train = data.splits["train"]
    vectorizer = TfidfVectorizer(**PEER_TFIDF, dtype=np.float32)
    X_train = vectorizer.fit_transform([texts[train.source][r] for r in train.rows])
    return ProbeRun(predictor, data, texts, vectorizer, X_train)


def report(split_name: str, what: str, ids: np.ndarray, key: np.ndarray, Y: sp.csr_matrix) -> None:
    """Re-rank the candidates ``ids`` by ``key`` (higher first; ties keep the run's order) and print
    P@1/3/5 on split ``split_name`` (``dev`` is printed as ``carved``)."""
    ranked = np.take_along_axis(ids, np.argsort(-key, axis=1, kind="stable"), 1)
    m = evaluate(Y, ranked[:, :5])
    label = "carved" if split_name == "dev" else "test"
    print(
        f"{label} {what}: P@1 {100 * m['P@1']:.2f} P@3 {100 * m['P@3']:.2f} P@5 {100 * m['P@5']:.2f}",
        flush=True,
    )
