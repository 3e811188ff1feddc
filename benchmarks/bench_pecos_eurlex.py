"""The peer on EURLEX57K (CPU): scikit-learn TF-IDF over word uni- and bigrams, then PECOS XR-Linear.

The recipe users compare a new XMC tool with first: ``TfidfVectorizer(ngram_range=(1, 2), min_df=2,
max_features=200000, sublinear_tf=True)`` fitted on the training texts (title and content joined by a
newline, as ``xmc`` reads them; rows L2-normalized), then ``XLinearModel`` with libpecos's defaults (PIFA
label features, hierarchical k-means) predicting with beam 50. Trains on ``trn.json.gz``, scores
``dev.json.gz`` with :func:`xmc.metrics.evaluate` (the same code that scores ``xmc`` runs) and appends one
JSON row to ``benchmarks/results/pecos_eurlex57k.jsonl``: metrics, feature and train seconds, peak RSS
of the process (data, features and model together), device and versions.

libpecos is a benchmark dependency, not a runtime one; it pins numpy < 2, so give it its own environment
that sees this checkout (``xmc`` is only imported for reading and scoring)::

    python -m venv --system-site-packages /tmp/venv-pecos && /tmp/venv-pecos/bin/pip install libpecos==1.2.8
    PYTHONPATH=. /tmp/venv-pecos/bin/python benchmarks/bench_pecos_eurlex.py [--data ../shared/data/eurlex57k]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from common import PEER_TFIDF, append_row, git_revision

from xmc.data.text import read_lf_json
from xmc.metrics import evaluate, inv_propensity

RESULTS = Path(__file__).parent / "results" / "pecos_eurlex57k.jsonl"
TFIDF = PEER_TFIDF
BEAM = 50


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurlex57k"
    parser.add_argument("--data", default=str(default), help="folder with trn/dev/lbl .json.gz")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import pecos
    import sklearn
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel
    from sklearn.feature_extraction.text import TfidfVectorizer

    folder = Path(args.data)
    labels = folder / "lbl.json.gz"
    train = read_lf_json(folder / "trn.json.gz", label_file=labels)
    dev = read_lf_json(folder / "dev.json.gz", label_file=labels)

    start = time.perf_counter()
    vectorizer = TfidfVectorizer(**TFIDF, dtype=np.float32)
    X_train = sp.csr_matrix(vectorizer.fit_transform(train.texts()), dtype=np.float32)
    X_dev = sp.csr_matrix(vectorizer.transform(dev.texts()), dtype=np.float32)
    feature_seconds = time.perf_counter() - start

    Y_train = sp.csr_matrix(train.Y, dtype=np.float32)
    start = time.perf_counter()
    label_features = LabelEmbeddingFactory.create(Y_train, X_train, method="pifa")
    cluster_chain = Indexer.gen(label_features, threads=args.threads)
    model = XLinearModel.train(X_train, Y_train, C=cluster_chain, threads=args.threads)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scores = model.predict(X_dev, beam_size=BEAM, only_topk=BEAM, threads=args.threads).tocsr()
    predict_seconds = time.perf_counter() - start
    topk = np.full((scores.shape[0], 5), -1, dtype=np.int64)
    for row in range(scores.shape[0]):
        lo, hi = scores.indptr[row], scores.indptr[row + 1]
        order = np.argsort(-scores.data[lo:hi], kind="stable")[:5]
        topk[row, : len(order)] = scores.indices[lo:hi][order]
    metrics = evaluate(dev.Y, topk, inv_propensity(train.Y, 0.55, 1.5), ks=(1, 3, 5))

    append_row(
        RESULTS,
        {
            "bench": "pecos_eurlex57k",
            "date": time.strftime("%Y-%m-%d"),
            "git": git_revision(),
            "device": f"CPU ({platform.machine()}, {args.threads} threads)",
            "versions": {
                "libpecos": pecos.__version__,
                "scikit-learn": sklearn.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "recipe": {"tfidf": {**TFIDF, "ngram_range": [1, 2]}, "xlinear": "defaults", "beam": BEAM},
            "train_docs": X_train.shape[0],
            "dev_docs": X_dev.shape[0],
            "features": X_train.shape[1],
            **{
                key: round(100 * float(metrics[key]), 2)
                for key in ("P@1", "P@3", "P@5", "nDCG@5", "RP@5", "PSP@5")
            },
            "feature_seconds": round(feature_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "predict_seconds": round(predict_seconds, 1),
            # ru_maxrss is KiB on Linux
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
    )


if __name__ == "__main__":
    main()
