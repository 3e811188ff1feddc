"""Swap a trained run's scores for its most frequent labels with converged linear SVMs (CPU probe, #32).

For the ``--labels F`` labels with the most training documents, one squared-hinge linear SVM each (liblinear
through scikit-learn's ``LinearSVC``, C = 1, as the peer's per-label solves) is fitted to convergence over
all columns of the peer's TF-IDF (``TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200000,
sublinear_tf=True)``) of the run's own training rows. Over the run's top 200 a head label's score becomes
``(1 - a) * run score + a * SVM score``; P@1/3/5 are printed by ``a`` on the carved split (to choose ``a``)
and the test split (to check). The question it answers: is the P@5 lost on frequent labels a matter of the
fixed fan-in support and the optimizer (three AdamW epochs) rather than of the model class? scikit-learn
comes with the package's sentence-transformers dependency. ``--support K`` gives each SVM only the K columns
of largest weight in its label's summed TF-IDF (the rule of ``classifier.ids=centroid``, without a fill), to
tell the fixed fan-in support from the solve::

    python benchmarks/probe_svm_head.py RUN_DIR [--labels 200 [400 ...]] [--jobs 1] [--support 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from probe_common import load_probe_run, report


def main() -> None:
    from joblib import Parallel, delayed
    from sklearn.svm import LinearSVC

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument(
        "--labels", type=int, nargs="+", default=[200], help="most frequent labels given SVMs (nested)"
    )
    parser.add_argument("--mix", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--jobs", type=int, default=1, help="SVMs fitted in parallel")
    parser.add_argument("--top", type=int, default=200, help="candidates re-ranked per document")
    parser.add_argument("--support", type=int, default=0, help="columns per SVM (0 = all)")
    args = parser.parse_args()
    if args.support < 0:
        raise SystemExit(f"--support {args.support}: give a column count, or 0 for all")
    start = time.time()
    run = load_probe_run(args.run_dir)
    num_labels = run.data.num_labels
    if not all(0 < n <= num_labels for n in args.labels):
        raise SystemExit(f"--labels {args.labels}: give counts from 1 to {num_labels}")
    most = max(args.labels)
    X_train, Y_train = run.X_train, run.data.splits["train"].Y.tocsc()
    frequency = np.asarray(Y_train.sum(0)).ravel()
    head = np.argsort(-frequency, kind="stable")[:most]
    print(
        f"TF-IDF {time.time() - start:.0f} s; {most} labels with "
        f"{frequency[head[-1]]:.0f}-{frequency[head[0]]:.0f} training documents",
        flush=True,
    )

    def fit(label: int) -> tuple[np.ndarray, float]:
        y = np.asarray(Y_train[:, label].todense()).ravel() > 0
        X, columns = X_train, slice(None)  # all columns: no copy of the matrix
        if args.support:
            centroid = np.asarray(X_train[y].sum(0)).ravel()
            columns = np.argsort(-centroid, kind="stable")[: min(args.support, int((centroid > 0).sum()))]
            X = X_train[:, columns]
        svm = LinearSVC(C=1.0, loss="squared_hinge", dual=True, max_iter=3000, random_state=0).fit(X, y)
        w = np.zeros(X_train.shape[1], np.float32)
        w[columns] = svm.coef_.ravel()
        return w, float(svm.intercept_[0])

    fitted = Parallel(n_jobs=args.jobs)(delayed(fit)(label) for label in head)
    W = np.stack([w for w, _ in fitted])
    b = np.array([bias for _, bias in fitted], np.float32)
    print(f"SVMs fitted, {time.time() - start:.0f} s", flush=True)
    for name in ("dev", "test"):
        scores, ids = run.candidates(name, args.top)
        svm_scores = np.asarray(run.tfidf(name) @ W.T) + b  # (N, most)
        Y = run.data.splits[name].Y.tocsr()
        for count in sorted(args.labels):
            slot = np.full(num_labels, -1)
            slot[head[:count]] = np.arange(count)
            in_head = slot[ids] >= 0
            at = np.where(in_head, np.take_along_axis(svm_scores, np.maximum(slot[ids], 0), 1), 0.0)
            for a in args.mix:
                label = f"a={a:g}" if len(args.labels) == 1 else f"F={count} a={a:g}"
                report(name, label, ids, np.where(in_head, (1 - a) * scores + a * at, scores), Y)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
