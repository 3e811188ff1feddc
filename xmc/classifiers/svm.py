"""Converged linear SVMs for a dense head over fixed inputs (``classifier.head_fit=svm``).

One L2-regularized squared-hinge linear SVM per head label, ``min_w 0.5 |w|^2 + C sum_i max(0, 1 - y_i
w.x_i)^2`` with y in {-1, +1} and the bias as one more (regularized) input of value 1, solved to
convergence by dual coordinate descent: liblinear's solver, through scikit-learn's ``LinearSVC``. This is
the per-label problem linear XMC methods (PECOS XR-Linear, Parabel, DiSMEC) solve; AdamW epochs over a
dense head reach a worse optimum of it in the same time. Labels are fitted in worker processes, in
batches, over one float64 CSR copy of the inputs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import warnings

import numpy as np
import scipy.sparse as sp

from xmc.progress import bars

log = logging.getLogger(__name__)

MAX_ITER = 3000  # liblinear passes over the data per label; the solve stops earlier at tolerance 1e-4


def fit_squared_hinge_svms(
    X: sp.spmatrix | np.ndarray,
    Y: sp.spmatrix,
    C: float = 1.0,
    *,
    jobs: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One squared-hinge SVM per column of ``Y`` (N, F) over ``X`` (N, D): ``(W (F, D), b (F,))`` float32.

    ``jobs``: worker processes fitting labels at once (default: torch's thread count; 1 fits in this
    process). Processes, not threads: liblinear draws its coordinate order from one process-wide
    generator, which threads would share, so a fit would depend on their timing. ``seed`` fixes that order
    per label: the result is the same for any ``jobs``. A label with no positive (or no negative) document
    gets w = 0 and b = -1 (+1), the margin the loss asks of every document.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # a declared dependency; a broken environment may still lack it
        raise ImportError(
            "classifier.head_fit=svm solves the head with liblinear from scikit-learn: "
            "pip install scikit-learn"
        ) from err
    if not C > 0:
        raise ValueError(f"classifier.head_c must be positive (the SVM's C), got {C}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{X.shape[0]} input rows for {Y.shape[0]} label rows")
    num_rows, num_labels = Y.shape
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)  # liblinear's type: converted once, not per label
        X.sort_indices()
    else:
        X = np.ascontiguousarray(X, dtype=np.float64)
    Yc = sp.csc_matrix(Y)
    Yc.sum_duplicates()
    columns = [Yc.indices[Yc.indptr[j] : Yc.indptr[j + 1]] for j in range(num_labels)]
    if jobs is None:
        import torch

        jobs = torch.get_num_threads()
    jobs = max(1, min(jobs, num_labels))
    # Batches of labels, dealt round-robin by positives (the slow fits) so the workers finish together;
    # a few batches a worker for progress, each batch one transfer of X (memory-mapped by joblib).
    by_size = np.argsort([-len(c) for c in columns], kind="stable")
    batches = [by_size[i :: 4 * jobs] for i in range(min(4 * jobs, num_labels))] if jobs > 1 else [by_size]
    started = time.perf_counter()
    log.info(
        "fitting %d head SVMs (C = %g) over %d documents x %d inputs in %d process%s",
        num_labels,
        C,
        num_rows,
        X.shape[1],
        jobs,
        "" if jobs == 1 else "es",
    )
    W = np.zeros((num_labels, X.shape[1]), np.float32)
    b = np.zeros(num_labels, np.float32)
    unconverged = []
    bar = None
    if bars(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=num_labels, desc="head SVMs", unit="label", leave=False)
    with _workers(jobs) as pool:
        if pool is None:
            results = (_fit_batch(X, [columns[j] for j in batch], C, seed) for batch in batches)
        else:
            from joblib import delayed

            results = pool(delayed(_fit_batch)(X, [columns[j] for j in batch], C, seed) for batch in batches)
        for batch, (w, bias, stalled) in zip(batches, results, strict=True):
            W[batch], b[batch] = w, bias
            unconverged += [int(batch[i]) for i in stalled]
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if unconverged:
        log.warning(
            "%d of %d head SVMs stopped at %d iterations before tolerance 1e-4 (labels %s...): a smaller "
            "classifier.head_c converges faster",
            len(unconverged),
            num_labels,
            MAX_ITER,
            sorted(unconverged)[:5],
        )
    log.info("%d head SVMs in %.1f s", num_labels, time.perf_counter() - started)
    return W, b


@contextlib.contextmanager
def _workers(jobs: int):
    """joblib's worker processes for ``jobs`` > 1 (None for 1), stopped on the way out: not left idle
    holding memory through training, and not left running when the fit stops. SIGTERM (a scheduler's
    stop) is turned into KeyboardInterrupt meanwhile, which joblib answers by terminating its workers."""
    if jobs == 1:
        yield None
        return
    from joblib import Parallel
    from joblib.externals.loky import reusable_executor

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum} while fitting the head SVMs")

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield Parallel(n_jobs=jobs, backend="loky", return_as="generator")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        # joblib keeps loky's one reusable executor alive for later calls (private, but the only handle:
        # get_reusable_executor() with other arguments would start a new one); tests check it is stopped
        executor = reusable_executor._executor
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)


def _fit_batch(X, positives: list[np.ndarray], C: float, seed: int):
    """Fit one SVM per entry of ``positives`` (the rows of X labelled positive): (W, b, stalled), where
    ``stalled`` lists the entries that reached MAX_ITER."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    W = np.zeros((len(positives), X.shape[1]), np.float32)
    b = np.zeros(len(positives), np.float32)
    stalled = []
    for i, rows in enumerate(positives):
        if len(rows) in (0, X.shape[0]):
            b[i] = 1.0 if len(rows) else -1.0
            continue
        y = np.zeros(X.shape[0], np.int8)
        y[rows] = 1
        svm = LinearSVC(C=C, loss="squared_hinge", dual=True, tol=1e-4, max_iter=MAX_ITER, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svm.fit(X, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            stalled.append(i)
        W[i] = svm.coef_.ravel()
        b[i] = svm.intercept_[0]
    return W, b, stalled
