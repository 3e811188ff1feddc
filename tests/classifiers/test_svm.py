"""classifier.head_fit=svm's solver: each label's squared-hinge SVM is the minimizer of its primal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xmc.classifiers.svm import fit_squared_hinge_svms


def _primal_gradient(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, C: float) -> np.ndarray:
    """Gradient of 0.5 |(w, b)|^2 + C sum_i max(0, 1 - y_i (w.x_i + b))^2 (the bias a regularized input
    of value 1, as liblinear's), y in {-1, +1}."""
    Xb = np.hstack([X, np.ones((X.shape[0], 1))])
    wb = np.append(w, b).astype(np.float64)
    slack = np.maximum(0.0, 1.0 - y * (Xb @ wb))
    return wb - 2 * C * Xb.T @ (slack * y)


@pytest.mark.parametrize("C", [0.1, 1.0])
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_each_label_is_at_its_primal_optimum(C, sparse):
    rng = np.random.default_rng(0)
    X = sp.random(300, 40, density=0.2, random_state=1, format="csr", dtype=np.float32)
    planted = rng.normal(size=(40, 5))
    Y = sp.csr_matrix((X @ planted + rng.normal(scale=0.3, size=(300, 5))) > 0.4)
    W, b = fit_squared_hinge_svms(X if sparse else X.toarray(), Y, C, jobs=2)
    assert W.shape == (5, 40) and b.shape == (5,) and W.dtype == np.float32
    Xd = X.toarray().astype(np.float64)
    for j in range(5):
        y = np.where(Y[:, j].toarray().ravel(), 1.0, -1.0)
        assert 10 < (y > 0).sum() < 290
        grad = _primal_gradient(Xd, y, W[j], b[j], C)
        start = _primal_gradient(Xd, y, np.zeros(40), 0.0, C)
        assert np.linalg.norm(grad) < 1e-3 * np.linalg.norm(start), j  # converged, not just trained
        assert (np.sign(Xd @ W[j] + b[j]) == y).mean() > 0.85  # and it is label j's model, not another's


def test_reproducible_over_worker_counts():
    X = sp.random(200, 30, density=0.3, random_state=2, format="csr")
    Y = sp.random(200, 6, density=0.2, random_state=3, format="csr")
    one = fit_squared_hinge_svms(X, Y, jobs=1)
    two = fit_squared_hinge_svms(X, Y, jobs=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_a_label_without_positives_or_negatives_gets_the_margin():
    X = sp.random(50, 10, density=0.5, random_state=4, format="csr")
    Y = sp.csr_matrix(np.stack([np.zeros(50), np.ones(50), np.arange(50) % 2], 1))
    W, b = fit_squared_hinge_svms(X, Y, jobs=1)
    assert (W[:2] == 0).all() and b[0] == -1 and b[1] == 1 and np.abs(W[2]).sum() > 0


def test_bad_arguments_are_named():
    X = sp.random(20, 5, density=0.5, random_state=5, format="csr")
    with pytest.raises(ValueError, match="head_c must be positive"):
        fit_squared_hinge_svms(X, sp.csr_matrix((20, 2)), C=0, jobs=1)
    with pytest.raises(ValueError, match="20 input rows for 19 label rows"):
        fit_squared_hinge_svms(X, sp.csr_matrix((19, 2)))


def test_sigterm_during_the_fit_interrupts_and_stops_the_workers():
    """A scheduler's SIGTERM while the workers fit raises KeyboardInterrupt (the run's Ctrl-C path: an
    unstarted run folder is removed) and leaves no worker process behind; the handler is restored."""
    import os
    import signal

    from joblib import delayed
    from joblib.externals.loky import reusable_executor

    from xmc.classifiers.svm import _workers

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="while fitting the head SVMs"):
        with _workers(2) as pool:
            assert list(pool(delayed(abs)(-i) for i in range(3))) == [0, 1, 2]  # the workers are up
            workers = list(reusable_executor._executor._processes.values())
            assert workers
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    for process in workers:
        process.join(timeout=10)
        assert not process.is_alive()


def test_the_workers_stop_when_the_fit_ends():
    """Not left idling (holding their copies of the inputs) through training."""
    from joblib.externals.loky import reusable_executor

    X = sp.random(60, 10, density=0.5, random_state=6, format="csr")
    Y = sp.random(60, 4, density=0.3, random_state=7, format="csr")
    fit_squared_hinge_svms(X, Y, jobs=2)
    executor = reusable_executor._executor
    assert executor is None or not any(p.is_alive() for p in executor._processes.values())
