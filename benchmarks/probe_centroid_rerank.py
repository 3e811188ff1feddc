"""Re-rank a trained run's top 200 by ``score + w * cosine(document, label centroid)`` (CPU probe, #32).

The centroid of a label is the L2-normalized sum of the TF-IDF rows (the peer's recipe: scikit-learn
``TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200000, sublinear_tf=True)``) of the run's own
training documents that carry it: the PIFA label features PECOS clusters on. Prints P@1/3/5 by weight on the
run's carved split (to choose w) and its test split (to check); scikit-learn comes with the package's
sentence-transformers dependency.

``--clusters N`` (a power of two) also tries the peer's other signal, a trained cluster score: the centroids
(reduced to 128 dimensions by truncated SVD) are split into N balanced clusters by recursive 2-means, one
squared-hinge linear SVM a cluster (liblinear, C = 1, as the peer's nodes) is trained over the TF-IDF rows,
and the top 200 are re-ranked by ``score + b * cluster_score`` and by the peer's product of l3-hinge
transforms ``exp(-max(0, 1 - s) ** 3)`` of the two::

    python benchmarks/probe_centroid_rerank.py RUN_DIR [--weights 0 0.25 0.5 1 2] [--clusters 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from probe_common import load_probe_run, report


def balanced_clusters(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Cluster id of each row: recursive balanced 2-means (halves split by the difference of the two
    cosine similarities), ``log2(count)`` levels deep."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(vectors), dtype=np.int64)
    parts = [np.arange(len(vectors))]
    for _ in range(int(round(np.log2(count)))):
        halves = []
        for part in parts:
            Z = vectors[part]
            centers = Z[rng.choice(len(part), 2, replace=False)]
            for _ in range(10):
                order = np.argsort(-(Z @ centers[0] - Z @ centers[1]), kind="stable")
                left, right = order[: len(part) // 2], order[len(part) // 2 :]
                centers = np.stack([Z[left].sum(0), Z[right].sum(0)])
                centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
            halves += [part[left], part[right]]
        parts = halves
    for k, part in enumerate(parts):
        ids[part] = k
    return ids


def cluster_scorer(X_train, Y_train: sp.csr_matrix, centroids, count: int):
    """(labels' cluster ids, a function of TF-IDF rows -> (N, count) cluster scores)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize
    from sklearn.svm import LinearSVC

    reduced = normalize(TruncatedSVD(128, random_state=0).fit_transform(centroids))
    clusters = balanced_clusters(reduced, count)
    member = sp.csr_matrix((np.ones(len(clusters)), (np.arange(len(clusters)), clusters)))
    Yc = np.asarray(((Y_train @ member) > 0).todense(), dtype=np.int8)
    weights = np.zeros((count, X_train.shape[1]), np.float32)
    # a cluster no training document carries never fires; one every document carries always does
    bias = np.where(Yc.all(axis=0), 1.0, -1.0).astype(np.float32)
    for c in range(count):
        if 0 < Yc[:, c].sum() < len(Yc):
            svm = LinearSVC(C=1.0, loss="squared_hinge", dual=True, max_iter=2000).fit(X_train, Yc[:, c])
            weights[c], bias[c] = svm.coef_.ravel(), svm.intercept_[0]
    return clusters, lambda X: np.asarray(X @ weights.T) + bias


def l3_hinge(s: np.ndarray) -> np.ndarray:
    return np.exp(-(np.maximum(0.0, 1.0 - s) ** 3))


def main() -> None:
    from sklearn.preprocessing import normalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 1.5, 2, 3])
    parser.add_argument("--top", type=int, default=200, help="candidates re-ranked per document")
    parser.add_argument("--clusters", type=int, default=0, help="also a trained cluster score (power of 2)")
    parser.add_argument("--cluster-weights", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.5, 1])
    args = parser.parse_args()
    if args.clusters and (args.clusters < 2 or args.clusters & (args.clusters - 1)):
        raise SystemExit(f"--clusters {args.clusters}: give a power of two (e.g. 64)")
    start = time.time()
    run = load_probe_run(args.run_dir)
    train = run.data.splits["train"]
    centroids = normalize(sp.csr_matrix(train.Y.T.astype(np.float32) @ run.X_train))
    print(f"centroids {centroids.shape}, {centroids.nnz:,} nonzeros, {time.time() - start:.0f} s", flush=True)
    if args.clusters:
        clusters, cluster_scores = cluster_scorer(run.X_train, train.Y.tocsr(), centroids, args.clusters)
        print(
            f"{args.clusters} clusters of {np.bincount(clusters).min()}-{np.bincount(clusters).max()} labels,"
            f" their SVMs trained, {time.time() - start:.0f} s",
            flush=True,
        )
    for name in ("dev", "test"):
        scores, ids = run.candidates(name, args.top)
        X = normalize(run.tfidf(name))
        cosine = np.zeros_like(scores)
        for a in range(0, X.shape[0], 500):
            block = (X[a : a + 500] @ centroids.T).toarray()
            cosine[a : a + 500] = np.take_along_axis(block, ids[a : a + 500], 1)
        Y = run.data.splits[name].Y.tocsr()
        for w in args.weights:
            report(name, f"w={w:g}", ids, scores + w * cosine, Y)
        if args.clusters:
            gate = np.take_along_axis(cluster_scores(X), clusters[ids], 1)
            for b in args.cluster_weights:
                report(name, f"cluster b={b:g}", ids, scores + b * gate, Y)
            key = l3_hinge(scores) * l3_hinge(gate) + 1e-6 * scores
            report(name, "cluster l3-hinge product", ids, key, Y)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
