"""Re-rank a trained run's top 200 by ``score + w * cosine(document, label centroid)`` (CPU probe, #32).

The centroid of a label is the L2-normalized sum of the TF-IDF rows (the peer's recipe: scikit-learn
``TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200000, sublinear_tf=True)``) of the run's own
training documents that carry it: the PIFA label features PECOS clusters on. Prints P@1/3/5 by weight on the
run's carved split (to choose w) and its test split (to check); scikit-learn comes with the package's
sentence-transformers dependency::

    python benchmarks/probe_centroid_rerank.py RUN_DIR [--weights 0 0.25 0.5 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from xmc.inference.predict import predict_rows
from xmc.inference.predictor import Predictor
from xmc.train.data import load_data

TFIDF = dict(ngram_range=(1, 2), min_df=2, max_features=200000, sublinear_tf=True, dtype=np.float32)


def precision(ids: np.ndarray, Y: sp.csr_matrix, k: int) -> float:
    rows = np.arange(ids.shape[0])[:, None]
    return 100.0 * float(Y[rows, ids[:, :k]].sum()) / (k * ids.shape[0])


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 1.5, 2, 3])
    parser.add_argument("--top", type=int, default=200, help="candidates re-ranked per document")
    args = parser.parse_args()
    start = time.time()
    predictor = Predictor(args.run_dir, device="cpu")
    data = load_data(predictor.config.data, predictor.config.seed)
    if "dev" not in data.splits or "test" not in data.splits:
        raise SystemExit(f"{args.run_dir}: the probe needs a run with a carved (dev) and a test split")
    texts = {name: list(source.texts()) for name, source in data.sources.items()}
    train = data.splits["train"]
    vectorizer = TfidfVectorizer(**TFIDF)
    X_train = vectorizer.fit_transform([texts[train.source][r] for r in train.rows])
    centroids = normalize(sp.csr_matrix(train.Y.T.astype(np.float32) @ X_train))
    print(f"centroids {centroids.shape}, {centroids.nnz:,} nonzeros, {time.time() - start:.0f} s", flush=True)
    for name in ("dev", "test"):
        split = data.splits[name]
        inputs = predictor.inputs(data.sources[split.source])
        scores, ids = predict_rows(
            predictor.model, inputs, split.rows, predictor.device, predictor.precision, 256, args.top
        )
        scores, ids = np.asarray(scores, np.float32), np.asarray(ids)
        X = normalize(vectorizer.transform([texts[split.source][r] for r in split.rows]))
        cosine = np.zeros_like(scores)
        for a in range(0, X.shape[0], 500):
            block = (X[a : a + 500] @ centroids.T).toarray()
            cosine[a : a + 500] = np.take_along_axis(block, ids[a : a + 500], 1)
        Y = split.Y.tocsr()
        label = "carved" if name == "dev" else "test"
        for w in args.weights:
            order = np.argsort(-(scores + w * cosine), axis=1, kind="stable")
            ranked = np.take_along_axis(ids, order, 1)
            p1, p3, p5 = (precision(ranked, Y, k) for k in (1, 3, 5))
            print(f"{label} w={w:g}: P@1 {p1:.2f} P@3 {p3:.2f} P@5 {p5:.2f}", flush=True)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
