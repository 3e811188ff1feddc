"""The fused classifier loss: gradients computed with the loss in one pass (every backend), and the fixed
fan-in Triton kernel that computes a label range's logits, loss and gradients in one launch.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest) on small odd shapes, its outputs
NaN-filled at allocation. Oracles: the unfused chunked loss (logits recomputed in backward) and a dense
float64 computation through autograd.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import xmc.kernels.fanin_common as fc
import xmc.kernels.fixed_fanin as ff
import xmc.kernels.fixed_fanin_loss as fl
from helpers import assert_close

from xmc.classifiers import DenseClassifier, FixedFanInClassifier, RPSClassifier
from xmc.losses import Positives, dense_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = 1e-5


@pytest.fixture
def poisoned(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (fl, ff, fc):
        monkeypatch.setattr(module, "new_output", nan_output)


def random_case(B, D, L, K, n_pos, bias=True, seed=0, device=DEVICE, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen).to(device, dtype)
    weight = (torch.randn(L, K, generator=gen) * 0.5).to(device, dtype)
    indices = torch.argsort(torch.rand(L, D, generator=gen), dim=1)[:, :K].to(device, torch.int16)
    b = torch.randn(L, generator=gen).to(device, dtype) if bias else None
    rows = torch.randint(0, B, (n_pos,), generator=gen)
    cols = torch.randint(0, L, (n_pos,), generator=gen)
    lists = [sorted({int(c) for r, c in zip(rows, cols, strict=True) if r == i}) for i in range(B)]
    return x, weight, indices, b, Positives.from_lists(lists, L, device=device)


# ----------------------------------------------------------------------------------------------------------
# The kernel against its reference twin
# ----------------------------------------------------------------------------------------------------------

# (B, D, L, K, positives, range start, range stop, range buffer bytes, bias): a label range inside the layer,
# several buffer ranges (the buffer holds 32 labels at B = 5), B = 1, no positives, B above a tile's 16 rows,
# one full tile (128), batches of several tiles (129: a one-document last tile; 300 with several buffer
# ranges), K = 1.
CASES = [
    (5, 37, 90, 7, 12, 10, 85, 32 * 5 * 4, True),
    (1, 20, 40, 5, 3, 0, 40, 2**25, True),
    (4, 19, 33, 3, 0, 0, 33, 2**25, False),
    (37, 30, 70, 9, 50, 3, 70, 32 * 37 * 4, True),
    (128, 24, 40, 4, 200, 0, 40, 2**25, True),
    (129, 11, 37, 3, 150, 0, 37, 2**25, True),
    (300, 13, 70, 4, 400, 6, 70, 32 * 300 * 4, True),
    (260, 9, 20, 2, 90, 0, 20, 2**25, False),
    (3, 10, 20, 1, 4, 5, 15, 2**25, True),
]


@needs_triton
@pytest.mark.parametrize("kind", ["bce", "squared_hinge"])
@pytest.mark.parametrize(
    "case", CASES, ids=[f"B{c[0]}-L{c[2]}-K{c[3]}-pos{c[4]}-{c[5]}:{c[6]}" for c in CASES]
)
def test_kernel_matches_reference(case, kind, poisoned, monkeypatch):
    B, D, L, K, n_pos, start, stop, buffer_bytes, bias = case
    monkeypatch.setattr(fl, "BWD_X_CHUNK_BYTES", buffer_bytes)
    x, w, idx, b, positives = random_case(B, D, L, K, n_pos, bias)
    rows, cols = positives.block(start, stop)
    scale = 1.0 / (B * L)
    want = fl.fixed_fanin_loss_reference(x, w, idx, b, rows, cols, kind, scale, start, stop)
    got = fl.fixed_fanin_loss_triton(
        x, w, idx, b, rows, cols, kind, scale, *fc.column_transpose(idx, D), start, stop
    )
    for g, r, what in zip(got, want, ("loss", "grad_x", "grad_w", "grad_b"), strict=True):
        if r is None:
            assert g is None, what
            continue
        assert_close(g.reshape(-1), r.reshape(-1), TOL, what)


@needs_triton
def test_kernel_without_the_input_gradient(poisoned):
    """Fixed inputs (no gradient to x): no column view needed, grad_x None, the rest unchanged."""
    x, w, idx, b, positives = random_case(4, 21, 30, 5, 6)
    rows, cols = positives.block(0, 30)
    want = fl.fixed_fanin_loss_reference(x, w, idx, b, rows, cols, "bce", 0.1, 0, 30, need_x=False)
    got = fl.fixed_fanin_loss_triton(x, w, idx, b, rows, cols, "bce", 0.1, None, None, 0, 30, need_x=False)
    assert got[1] is None and want[1] is None
    for g, r, what in zip(
        got[::2] + got[3:], want[::2] + want[3:], ("loss", "grad_w", "grad_b"), strict=True
    ):
        assert_close(g.reshape(-1), r.reshape(-1), TOL, what)


@needs_triton
def test_kernel_refuses_bad_ranges(poisoned):
    x, w, idx, b, positives = random_case(129, 10, 8, 2, 3, device="cpu")
    rows, cols = positives.block(0, 8)
    transpose = fc.column_transpose(idx, 10)
    with pytest.raises(ValueError, match="not within L = 8"):
        fl.fixed_fanin_loss_triton(x[:4], w, idx, b, rows, cols, "bce", 1.0, *transpose, 0, 9)
    with pytest.raises(ValueError, match="unknown loss"):
        fl.fixed_fanin_loss_triton(x[:4], w, idx, b, rows, cols, "hinge", 1.0, *transpose, 0, 8)


# ----------------------------------------------------------------------------------------------------------
# Classifiers: the fused loss against the recomputing one and a dense autograd oracle
# ----------------------------------------------------------------------------------------------------------


def _classifiers():
    return {
        "dense": lambda: DenseClassifier(13, 37),
        "fixed_fanin": lambda: FixedFanInClassifier(13, 37, 4, seed=2),
        "grouped": lambda: FixedFanInClassifier(13, 37, 4, seed=2, group=4),
        "rps": lambda: RPSClassifier(13, 37, method="stable", compression=4.0, seed=2),
    }


def _loss_and_grads(clf, h0, positives, kind, fused, weight=0.7, micro=1):
    """``weight * loss`` (an upstream gradient that is not 1), over ``micro`` backward calls (gradient
    accumulation): the loss values and the gradients of h and of every classifier parameter."""
    clf.fused_loss = fused
    clf.zero_grad(set_to_none=True)
    h = h0.clone().requires_grad_(True)
    values = []
    for _ in range(micro):
        value = clf.loss(h, positives, kind)
        (weight * value).backward()
        values.append(value.detach())
    return values, [h.grad] + [p.grad for p in clf.parameters()]


@pytest.mark.parametrize("kind", ["bce", "squared_hinge"])
@pytest.mark.parametrize("name", ["dense", "fixed_fanin", "grouped", "rps"])
def test_fused_loss_equals_the_recomputing_loss(name, kind, monkeypatch):
    import xmc.classifiers.chunked as chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 6 * 9)  # several label chunks at B = 6
    _, _, _, _, positives = random_case(6, 13, 37, 4, 14, device="cpu")
    h0 = torch.randn(6, 13, generator=torch.Generator().manual_seed(4))
    clf = _classifiers()[name]()
    plain_values, plain = _loss_and_grads(clf, h0, positives, kind, fused=False, micro=2)
    fused_values, fused = _loss_and_grads(clf, h0, positives, kind, fused=True, micro=2)
    assert_close(torch.stack(fused_values), torch.stack(plain_values), 1e-6, "loss")
    for i, (got, want) in enumerate(zip(fused, plain, strict=True)):
        assert got is not None and want is not None, f"gradient {i} missing"
        assert_close(got, want, 1e-6, f"gradient {i}")


def test_fused_loss_matches_dense_autograd():
    """The fixed fan-in classifier's fused loss and gradients equal autograd through its dense view."""
    clf = FixedFanInClassifier(13, 37, 4, seed=2)
    _, _, _, _, positives = random_case(6, 13, 37, 4, 14, device="cpu")
    h0 = torch.randn(6, 13, generator=torch.Generator().manual_seed(4))
    _, got = _loss_and_grads(clf, h0, positives, "bce", fused=True, weight=1.0)
    h = h0.clone().requires_grad_(True)
    dense = clf.layer.to_dense().detach().requires_grad_(True)
    bias = clf.layer.bias.detach().clone().requires_grad_(True)
    gh, gw, gb = torch.autograd.grad(dense_loss(h @ dense.T + bias, positives, "bce"), [h, dense, bias])
    assert_close(got[0], gh, TOL, "grad_h")
    assert_close(got[1], gw.gather(1, clf.layer.indices.long()), TOL, "grad_w")
    assert_close(got[2], gb, TOL, "grad_b")


def test_loss_without_gradients_takes_no_fused_pass():
    """Under no_grad (evaluation) the loss is the forward alone: no gradients computed or kept."""
    clf = FixedFanInClassifier(13, 37, 4, seed=2)
    _, _, _, _, positives = random_case(6, 13, 37, 4, 14, device="cpu")
    with torch.no_grad():
        value = clf.loss(torch.randn(6, 13), positives, "bce")
    assert value.grad_fn is None and clf.layer.weight.grad is None


@needs_triton
@pytest.mark.parametrize("kind", ["bce", "squared_hinge"])
def test_classifier_fused_kernel_path(kind, poisoned, monkeypatch):
    """The classifier's fused pass through the Triton kernel (interpreted), several label chunks, against
    the same classifier on the reference path."""
    import xmc.classifiers.chunked as chunked
    import xmc.classifiers.fixed_fanin as clf_module

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 5 * 16)
    _, _, _, _, positives = random_case(5, 17, 50, 6, 12, device="cpu")
    h0 = torch.randn(5, 17, generator=torch.Generator().manual_seed(6))
    results = []
    for triton_path in (False, True):
        monkeypatch.setattr(clf_module, "use_triton", lambda backend, x, weight, on=triton_path: on)
        monkeypatch.setattr(ff, "use_triton", lambda backend, x, weight, on=triton_path: on)
        clf = FixedFanInClassifier(17, 50, 6, seed=1)
        results.append(_loss_and_grads(clf, h0, positives, kind, fused=True))
    (ref_values, ref_grads), (values, grads) = results
    assert_close(values[0], ref_values[0], TOL, "loss")
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(got, want, TOL, f"gradient {i}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [128, 512])
def test_gpu_fused_kernel(dtype, B, poisoned):
    """The compiled kernel against the reference at a size with several label ranges (512: four tiles)."""
    D, L, K = 768, 300_007, 64
    x, w, idx, b, positives = random_case(B, D, L, K, 700 * B // 128, device="cuda", dtype=dtype, seed=3)
    rows, cols = positives.block(0, L)
    scale = 1.0 / (B * L)
    want = fl.fixed_fanin_loss_reference(
        x.double(), w.double(), idx, b.double(), rows, cols, "bce", scale, 0, L
    )
    got = fl.fixed_fanin_loss_triton(
        x, w, idx, b, rows, cols, "bce", scale, *fc.column_transpose(idx, D), 0, L
    )
    tol = TOL if dtype == torch.float32 else 1e-2
    for g, r, what in zip(got, want, ("loss", "grad_x", "grad_w", "grad_b"), strict=True):
        assert_close(g.reshape(-1), r.reshape(-1), tol, what)


def test_fp16_keeps_the_recomputing_loss():
    """Under fp16 (activations or autocast) a chunk's gradient would underflow before the loss scale,
    known only in backward, multiplies it: the loss takes the recomputing path there."""
    clf = DenseClassifier(13, 37)
    _, _, _, _, positives = random_case(6, 13, 37, 4, 14, device="cpu")
    h = torch.randn(6, 13, requires_grad=True)
    assert "Fused" in type(clf.loss(h, positives, "bce").grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.float16):
        assert "Fused" not in type(clf.loss(h, positives, "bce").grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Fused" in type(clf.loss(h, positives, "bce").grad_fn).__name__


@needs_triton
def test_kernel_build_failure_falls_back_with_a_warning(poisoned, monkeypatch, caplog):
    """A GPU or compiler that cannot build the fused kernel: one warning, then the per-chunk loss, with the
    same loss and gradients."""
    from triton.runtime.errors import OutOfResources

    import xmc.classifiers.fixed_fanin as clf_module

    def cannot_build(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setitem(clf_module._FUSED_KERNEL, "usable", True)
    monkeypatch.setattr(clf_module, "fixed_fanin_loss_triton", cannot_build)
    monkeypatch.setattr(clf_module, "use_triton", lambda backend, x, weight: True)
    monkeypatch.setattr(ff, "use_triton", lambda backend, x, weight: True)
    _, _, _, _, positives = random_case(4, 11, 20, 3, 6, device="cpu")
    h0 = torch.randn(4, 11, generator=torch.Generator().manual_seed(8))
    clf = FixedFanInClassifier(11, 20, 3, seed=4)
    with caplog.at_level("WARNING", logger="xmc.classifiers.fixed_fanin"):
        values, grads = _loss_and_grads(clf, h0, positives, "bce", fused=True, micro=2)
    assert sum("could not be built" in r.getMessage() for r in caplog.records) == 1
    assert clf_module._FUSED_KERNEL["usable"] is False
    ref_values, ref_grads = _loss_and_grads(clf, h0, positives, "bce", fused=False, micro=2)
    assert_close(torch.stack(values), torch.stack(ref_values), TOL, "loss")
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(got, want, TOL, f"gradient {i}")
