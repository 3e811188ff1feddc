"""Fixed fan-in op: Triton launchers and the PyTorch reference against a dense masked computation in float64.

Without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` (set below, before triton is imported), on
small odd shapes. Every Triton output is allocated NaN-filled here, so an element a kernel never writes fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import NamedTuple

import pytest
import torch
from helpers import assert_close

# Triton reads TRITON_INTERPRET when its jit functions are defined, its own library functions included, so it
# has to be set before the first `import triton` anywhere in the process.
TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xmc.kernels.fanin_common as fc  # noqa: E402  (after TRITON_INTERPRET)
import xmc.kernels.fixed_fanin as ff  # noqa: E402
import xmc.kernels.fixed_fanin_reference as ffr  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2


# ----------------------------------------------------------------------------------------------------------
# Helpers: random layers (distinct ids per row) and the dense float64 oracle
# ----------------------------------------------------------------------------------------------------------


class Layer(NamedTuple):
    x: torch.Tensor  # (B, D)
    weight: torch.Tensor  # (L, K)
    indices: torch.Tensor  # (L, K), distinct within a row
    bias: torch.Tensor | None  # (L,)
    grad_out: torch.Tensor  # (B, L)


def random_layer(
    B: int,
    D: int,
    L: int,
    K: int,
    index_dtype: torch.dtype = torch.int32,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
    device: str = DEVICE,
) -> Layer:
    """A random layer; each row's K ids are the first K of a random permutation of range(D)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(L, K, generator=gen, dtype=torch.float64)
    indices = torch.argsort(torch.rand(L, D, generator=gen), dim=1)[:, :K].to(index_dtype)
    b = torch.randn(L, generator=gen, dtype=torch.float64) if bias else None
    grad_out = torch.randn(B, L, generator=gen, dtype=torch.float64)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return Layer(cast(x), cast(weight), indices.to(device), cast(b), cast(grad_out))


def dense_oracle(layer: Layer) -> tuple[torch.Tensor, ...]:
    """(out, grad_x, grad_w, grad_b) in float64 from the dense (L, D) masked weight."""
    x, w, g = layer.x.double(), layer.weight.double(), layer.grad_out.double()
    cols = layer.indices.long()
    dense = torch.zeros(w.shape[0], x.shape[1], dtype=torch.float64, device=x.device).scatter_(1, cols, w)
    out = x @ dense.T
    if layer.bias is not None:
        out = out + layer.bias.double()
    grad_x = g @ dense
    grad_w = (g.T @ x).gather(1, cols)
    return out, grad_x, grad_w, g.sum(dim=0)


@pytest.fixture
def interpreted():
    """The Triton tests need CUDA or an interpreter-mode Triton; fail clearly when neither is available."""
    if not torch.cuda.is_available() and TRITON_IMPORTED_COMPILED:
        pytest.fail(
            "triton was imported (by an earlier test module) before TRITON_INTERPRET=1 was set, so its "
            "kernels cannot run on this CPU-only machine: set TRITON_INTERPRET=1 at the top of "
            "tests/conftest.py (before anything imports triton) or in the environment"
        )


@pytest.fixture
def poisoned(interpreted, monkeypatch):
    """Make every Triton output start as NaN, so an element a kernel never writes shows up."""

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (ff, fc):  # the launchers, and the input gradient's partial sums
        monkeypatch.setattr(module, "new_output", nan_output)


# (B, D, L, K, index dtype, bias): B=1, K=1, D not a multiple of 16, L below / at / above a label block, K not
# a multiple of the unroll (4), K above 16, a full row (K == D), a single label, B over two batch blocks.
SHAPES = [
    (1, 24, 33, 5, torch.int16, True),
    (3, 17, 70, 1, torch.int32, True),
    (5, 40, 64, 9, torch.int16, False),
    (4, 31, 45, 7, torch.int32, True),
    (2, 9, 1, 9, torch.int16, True),
    (37, 20, 19, 3, torch.int32, True),
    (3, 38, 21, 17, torch.int16, True),
    (6, 300, 50, 4, torch.int16, True),  # D >= 16 K: the reference's sampled weight gradient
    (130, 20, 19, 3, torch.int16, True),  # B above the largest batch block (128): two blocks
]
SHAPE_IDS = [f"B{b}-D{d}-L{n}-K{k}-{str(t)[6:]}{'-bias' if bias else ''}" for b, d, n, k, t, bias in SHAPES]


# ----------------------------------------------------------------------------------------------------------
# Triton launchers (interpreted on CPU)
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_matches_dense(shape, poisoned):
    B, D, L, K, index_dtype, bias = shape
    layer = random_layer(B, D, L, K, index_dtype, bias=bias)
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)

    out = ff.fixed_fanin_forward_triton(layer.x, layer.weight, layer.indices, layer.bias)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, FP32_TOL, "out")

    col_ptr, slots = fc.column_transpose(layer.indices, D)
    grad_x, grad_w, grad_b = ff.fixed_fanin_backward_triton(
        layer.grad_out, layer.x, layer.weight, layer.indices, col_ptr, slots, True, True, True
    )
    assert_close(grad_x, gx_ref, FP32_TOL, "grad_x")
    assert_close(grad_w, gw_ref, FP32_TOL, "grad_w")
    assert_close(grad_b, gb_ref, FP32_TOL, "grad_b")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype, poisoned):
    """bf16 / fp16 operands, fp32 accumulation: compare with float64 of the rounded inputs."""
    layer = random_layer(5, 37, 70, 9, torch.int16, dtype=dtype)
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)  # the oracle upcasts the already-rounded tensors
    out = ff.fixed_fanin_forward_triton(layer.x, layer.weight, layer.indices, layer.bias)
    col_ptr, slots = fc.column_transpose(layer.indices, 37)
    grads = ff.fixed_fanin_backward_triton(
        layer.grad_out, layer.x, layer.weight, layer.indices, col_ptr, slots, True, True, True
    )
    for got, want, what in zip(
        (out, *grads), (out_ref, gx_ref, gw_ref, gb_ref), ("out", "gx", "gw", "gb"), strict=True
    ):
        assert got.dtype == dtype, what
        assert_close(got, want, LOW_PRECISION_TOL, what)


@needs_triton
def test_triton_input_gradient_in_label_ranges(poisoned, monkeypatch):
    """The input gradient over several label ranges (each column's slots found by binary search) and split
    into parts: ranges of 7 labels, parts of at least one slot."""
    monkeypatch.setattr(fc, "BWD_X_CHUNK_BYTES", 7 * 3 * 4)  # 7 labels a range at B = 3, fp32
    monkeypatch.setattr(fc, "BWD_X_SPLIT_SLOTS", 1)
    layer = random_layer(3, 11, 40, 5, torch.int16, seed=5)
    want = dense_oracle(layer)[1]
    grad_x, _, _ = ff.fixed_fanin_backward(
        layer.grad_out, layer.x, layer.weight, layer.indices, need_w=False, need_b=False, backend="triton"
    )
    assert_close(grad_x, want, FP32_TOL, "grad_x")


@needs_triton
@pytest.mark.parametrize("range_bytes", [2**25, 5 * 3 * 4], ids=["one-range", "ranges-of-5"])
def test_triton_input_gradient_of_a_label_block(poisoned, monkeypatch, range_bytes):
    """A block of labels (7..26 of 45) through the whole layer's transpose equals the block's own gradient."""
    monkeypatch.setattr(fc, "BWD_X_CHUNK_BYTES", range_bytes)
    layer = random_layer(3, 13, 45, 6, torch.int16, seed=7)
    block = layer._replace(
        weight=layer.weight[7:27], indices=layer.indices[7:27], bias=None, grad_out=layer.grad_out[:, 7:27]
    )
    want = dense_oracle(block)[1]
    transpose = fc.column_transpose(layer.indices, 13)
    got = ff.fixed_fanin_input_gradient_triton(block.grad_out, layer.x, layer.weight, *transpose, row_start=7)
    assert_close(got, want, FP32_TOL, "grad_x of labels 7..26")
    with pytest.raises(ValueError, match="within L = 45"):
        ff.fixed_fanin_input_gradient_triton(block.grad_out, layer.x, layer.weight, *transpose, row_start=30)


@needs_triton
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_classifier_chunked_loss_on_the_triton_path(loss, poisoned, monkeypatch):
    """The label-chunked loss through the kernels (interpreted): each chunk's input gradient from the
    layer's cached transpose; loss and gradients as the reference backend gives them."""
    import xmc.classifiers.chunked as chunked
    import xmc.classifiers.fixed_fanin as clf_module
    from xmc.classifiers import FixedFanInClassifier
    from xmc.losses import Positives

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 9)  # 9 labels a chunk over 40: 5 chunks
    positives = Positives.from_lists([[0, 5], [], [39, 12], [1, 2, 3, 20]], 40)
    h0 = torch.randn(4, 19, generator=torch.Generator().manual_seed(1))
    results = []
    for triton_path in (False, True):
        on = (lambda backend, x, weight: True) if triton_path else (lambda backend, x, weight: False)
        monkeypatch.setattr(ff, "use_triton", on)
        monkeypatch.setattr(clf_module, "use_triton", on)
        torch.manual_seed(0)
        clf = FixedFanInClassifier(19, 40, 5, seed=3)
        h = h0.clone().requires_grad_(True)
        value = clf.loss(h, positives, loss)
        results.append((value, *torch.autograd.grad(value, [h, *clf.label_parameters()])))
    for got, want, what in zip(results[1], results[0], ("loss", "grad_h", "grad_w", "grad_b"), strict=True):
        assert_close(got.reshape(-1), want.reshape(-1), FP32_TOL, what)


@needs_triton
def test_triton_mixed_dtypes(poisoned):
    """bf16 activations, fp32 weights (autocast style): out and grad_x follow x, grad_w the weight."""
    layer = random_layer(4, 31, 45, 7, torch.int32)
    x = layer.x.bfloat16()
    layer = layer._replace(x=x, grad_out=layer.grad_out.bfloat16())
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)
    out = ff.fixed_fanin_forward_triton(x, layer.weight, layer.indices, layer.bias)
    grad_x, grad_w, grad_b = ff.fixed_fanin_backward(
        layer.grad_out, x, layer.weight, layer.indices, backend="triton"
    )
    assert out.dtype == grad_x.dtype == torch.bfloat16
    assert grad_w.dtype == grad_b.dtype == torch.float32
    assert_close(out, out_ref, LOW_PRECISION_TOL, "out")
    assert_close(grad_x, gx_ref, LOW_PRECISION_TOL, "grad_x")
    assert_close(grad_w, gw_ref, FP32_TOL, "grad_w")  # fp32 output: only the fp32 accumulation errs
    assert_close(grad_b, gb_ref, FP32_TOL, "grad_b")


@needs_triton
@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_triton_backward_subsets(need, poisoned):
    layer = random_layer(3, 19, 40, 4, torch.int16)
    want = dense_oracle(layer)[1:]
    col_ptr, slots = fc.column_transpose(layer.indices, 19) if need[0] else (None, None)
    got = ff.fixed_fanin_backward_triton(
        layer.grad_out, layer.x, layer.weight, layer.indices, col_ptr, slots, *need
    )
    for flag, g, w, what in zip(need, got, want, ("grad_x", "grad_w", "grad_b"), strict=True):
        if flag:
            assert_close(g, w, FP32_TOL, what)
        else:
            assert g is None, what


@needs_triton
def test_triton_strided_inputs(poisoned):
    """Non-contiguous inputs (transposed views) give the same result as contiguous ones."""
    layer = random_layer(4, 23, 35, 6, torch.int32)
    out_ref, gx_ref, gw_ref, _ = dense_oracle(layer)
    x_t = layer.x.T.contiguous().T
    g_t = layer.grad_out.T.contiguous().T
    w_t = layer.weight.T.contiguous().T
    assert not x_t.is_contiguous() and not g_t.is_contiguous()
    assert_close(ff.fixed_fanin_forward_triton(x_t, w_t, layer.indices, layer.bias), out_ref, FP32_TOL, "out")
    grad_x, grad_w, _ = ff.fixed_fanin_backward(g_t, x_t, w_t, layer.indices, need_b=False, backend="triton")
    assert_close(grad_x, gx_ref, FP32_TOL, "grad_x")
    assert_close(grad_w, gw_ref, FP32_TOL, "grad_w")


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_function_triton_backend(bias, poisoned):
    """Autograd through the Triton backend, with the transpose cached and computed on demand."""
    layer = random_layer(3, 26, 50, 5, torch.int16, bias=bias)
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)
    for transpose in (None, fc.column_transpose(layer.indices, 26)):
        x = layer.x.clone().requires_grad_()
        w = layer.weight.clone().requires_grad_()
        b = layer.bias.clone().requires_grad_() if bias else None
        out = ff.fixed_fanin(x, w, layer.indices, b, transpose=transpose, backend="triton")
        out.backward(layer.grad_out)
        assert_close(out.detach(), out_ref, FP32_TOL, "out")
        assert_close(x.grad, gx_ref, FP32_TOL, "grad_x")
        assert_close(w.grad, gw_ref, FP32_TOL, "grad_w")
        if bias:
            assert_close(b.grad, gb_ref, FP32_TOL, "grad_b")


@needs_triton
def test_triton_validation():
    layer = random_layer(2, 10, 12, 3, torch.int32)
    x, w, idx, b, g = layer
    with pytest.raises(ValueError, match="float64"):
        ff.fixed_fanin_forward_triton(x.double(), w, idx, b)
    with pytest.raises(ValueError, match="indices dtype"):
        ff.fixed_fanin_forward_triton(x, w, idx.long(), b)
    with pytest.raises(ValueError, match=r"\(L, K\)"):
        ff.fixed_fanin_forward_triton(x, w, idx[:, :2], b)
    with pytest.raises(ValueError, match="bias"):
        ff.fixed_fanin_forward_triton(x, w, idx, b[:5])
    with pytest.raises(ValueError, match="2-D"):
        ff.fixed_fanin_forward_triton(x[0], w, idx, b)
    with pytest.raises(ValueError, match="column_transpose"):
        ff.fixed_fanin_backward_triton(g, x, w, idx, None, None, True, True, True)
    with pytest.raises(ValueError, match="grad_out"):
        ff.fixed_fanin_backward_triton(g[:, :5], x, w, idx, None, None, False, True, True)
    col_ptr, slots = fc.column_transpose(idx, 10)
    with pytest.raises(ValueError, match="slots"):
        ff.fixed_fanin_backward_triton(g, x, w, idx, col_ptr, slots.float(), True, False, False)
    with pytest.raises(ValueError, match="col_ptr"):
        ff.fixed_fanin_backward_triton(g, x, w, idx, col_ptr[:-1], slots, True, False, False)
    with pytest.raises(ValueError, match="backend"):
        ff.fixed_fanin_forward(x, w, idx, b, backend="cuda")


# ----------------------------------------------------------------------------------------------------------
# Reference twin, dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reference_matches_dense(shape, dtype):
    B, D, L, K, index_dtype, bias = shape
    layer = random_layer(B, D, L, K, index_dtype, dtype=dtype, bias=bias, device="cpu")
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)
    tol = FP32_TOL if dtype == torch.float32 else 1e-12
    out = ffr.fixed_fanin_forward_reference(layer.x, layer.weight, layer.indices, layer.bias)
    assert out.dtype == dtype
    assert_close(out, out_ref, tol, "out")
    grad_x, grad_w, grad_b = ffr.fixed_fanin_backward_reference(
        layer.grad_out, layer.x, layer.weight, layer.indices
    )
    assert (grad_x.dtype, grad_w.dtype, grad_b.dtype) == (dtype,) * 3
    assert_close(grad_x, gx_ref, tol, "grad_x")
    assert_close(grad_w, gw_ref, tol, "grad_w")
    assert_close(grad_b, gb_ref, tol, "grad_b")


@pytest.mark.parametrize(
    "width, budget",
    [(17, 17 * 9), (80, 4 * 9)],  # D < 16 K: dense weight-gradient product; D >= 16 K: sampled (SDDMM)
    ids=["dense-wgrad", "sampled-wgrad"],
)
def test_reference_chunks(width, budget, monkeypatch):
    """A tiny chunk budget (several chunks, a ragged last one) gives the same result as one chunk, on
    both weight-gradient paths (a second chunk on the sampled one once failed: EURLEX57K at K = 4,096)."""
    layer = random_layer(3, width, 70, 4, torch.int16, dtype=torch.float64, device="cpu")
    monkeypatch.setattr(ffr, "REFERENCE_CHUNK_ELEMENTS", budget)  # 9 labels per chunk: 8 chunks, last has 7
    sampled = width >= ffr.SAMPLED_WIDTH_RATIO * 4
    assert sampled == (width == 80)
    assert ffr._slot_chunk(4, 1 if sampled else width) == 9
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(layer)
    out = ffr.fixed_fanin_forward_reference(layer.x, layer.weight, layer.indices, layer.bias)
    grads = ffr.fixed_fanin_backward_reference(layer.grad_out, layer.x, layer.weight, layer.indices)
    for got, want, what in zip(
        (out, *grads), (out_ref, gx_ref, gw_ref, gb_ref), ("out", "gx", "gw", "gb"), strict=True
    ):
        assert_close(got, want, 1e-12, what)


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto picked Triton for CPU tensors")

    monkeypatch.setattr(ff, "fixed_fanin_forward_triton", refuse)
    monkeypatch.setattr(ff, "fixed_fanin_backward_triton", refuse)
    layer = random_layer(2, 12, 15, 3, torch.int16, dtype=torch.float64, device="cpu")
    x = layer.x.clone().requires_grad_()
    out = ff.fixed_fanin(x, layer.weight, layer.indices, layer.bias)
    out.backward(layer.grad_out)
    out_ref, gx_ref, _, _ = dense_oracle(layer)
    assert_close(out.detach(), out_ref, 1e-12, "out")
    assert_close(x.grad, gx_ref, 1e-12, "grad_x")


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_reference_function(bias):
    layer = random_layer(3, 7, 6, 3, torch.int16, dtype=torch.float64, bias=bias, device="cpu")
    inputs = (layer.x.requires_grad_(), layer.weight.requires_grad_())
    if bias:
        inputs += (layer.bias.requires_grad_(),)

    def fn(x, w, b=None):
        return ff.FixedFanInFunction.apply(x, w, layer.indices, b, None, None, "reference")

    assert torch.autograd.gradcheck(fn, inputs)


def test_function_grads_only_for_inputs_that_need_them():
    layer = random_layer(2, 8, 5, 2, torch.int32, dtype=torch.float64, device="cpu")
    w = layer.weight.clone().requires_grad_()
    out = ff.fixed_fanin(layer.x, w, layer.indices, layer.bias)
    out.backward(layer.grad_out)
    assert layer.x.grad is None and layer.bias.grad is None
    assert_close(w.grad, dense_oracle(layer)[2], 1e-12, "grad_w")


# ----------------------------------------------------------------------------------------------------------
# CSC transpose
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2**23, 17], ids=["one-chunk", "chunks-of-17"])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_column_transpose(index_dtype, chunk, monkeypatch):
    monkeypatch.setattr(fc, "TRANSPOSE_CHUNK", chunk)  # 17: slots of one row straddle chunk ends
    D, L, K = 13, 29, 5
    indices = random_layer(1, D, L, K, index_dtype, device="cpu").indices
    col_ptr, slots = fc.column_transpose(indices, D)
    assert torch.equal(slots.long(), torch.argsort(indices.reshape(-1), stable=True))
    assert col_ptr.dtype == torch.int64 and col_ptr.shape == (D + 1,)
    assert slots.dtype == torch.int32 and slots.shape == (L * K,)
    flat = indices.reshape(-1).long()
    assert torch.equal(torch.sort(slots.long()).values, torch.arange(L * K))  # every slot exactly once
    cols = flat[slots.long()]
    assert bool((cols[1:] >= cols[:-1]).all())  # sorted by column
    assert col_ptr[0] == 0 and torch.equal(col_ptr.diff(), torch.bincount(flat, minlength=D))
    for d in range(D):  # each column's segment holds exactly its slots, in row order (stable)
        segment = slots[col_ptr[d] : col_ptr[d + 1]].long()
        assert bool((flat[segment] == d).all())
        assert bool((segment[1:] > segment[:-1]).all())


def test_column_transpose_rejects_out_of_range():
    indices = torch.tensor([[0, 5], [1, 2]], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        fc.column_transpose(indices, 5)
    with pytest.raises(ValueError, match="2-D integer"):
        fc.column_transpose(indices.float(), 6)


# ----------------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------------


# (B, L, K, index dtype): the kernel benchmark's batch with a prime L; K odd and not a multiple of the unroll;
# an odd batch; a batch over three blocks (the weight gradient's multi-block path); one label and one row.
GPU_SHAPES = [
    (128, 30_011, 32, torch.int16),
    (128, 20_011, 129, torch.int32),
    (37, 9_973, 64, torch.int16),
    (300, 5_003, 48, torch.int16),
    (1, 1, 7, torch.int32),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"B{b}-L{n}-K{k}" for b, n, k, _ in GPU_SHAPES])
def test_gpu_matches_reference(dtype, shape, poisoned):
    """Compiled kernels against float64 of the (rounded) inputs; fresh inputs per case, poisoned outputs."""
    B, L, K, index_dtype = shape
    D = 768
    seed = GPU_SHAPES.index(shape) * 2 + (dtype == torch.bfloat16)
    layer = random_layer(B, D, L, K, index_dtype, dtype=dtype, seed=seed, device="cuda")
    oracle = dense_oracle(layer)
    tol = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL
    out = ff.fixed_fanin_forward(layer.x, layer.weight, layer.indices, layer.bias)  # auto: Triton on CUDA
    transpose = fc.column_transpose(layer.indices, D)
    grads = ff.fixed_fanin_backward(layer.grad_out, layer.x, layer.weight, layer.indices, *transpose)
    for got, want, what in zip((out, *grads), oracle, ("out", "gx", "gw", "gb"), strict=True):
        assert got.dtype == dtype, what
        assert_close(got, want, tol, what)
    again = ff.fixed_fanin_backward(layer.grad_out, layer.x, layer.weight, layer.indices, *transpose)
    assert torch.equal(grads[0], again[0])  # the gather formulation is deterministic


@pytest.mark.gpu
@needs_cuda
def test_gpu_64bit_offsets(poisoned):
    """L * K and B * L both above 2**31 (about 23 GB of bf16 / int16 tensors); checked on the last rows."""
    B, D, L, K = 17, 32, 2**27 + 5, 17
    assert L * K > 2**31 and B * L > 2**31
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, D, device=dev, dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(L, K, device=dev, dtype=torch.bfloat16, generator=gen)
    bias = torch.randn(L, device=dev, dtype=torch.bfloat16, generator=gen)
    # Row l uses columns (l + j) % D: distinct within a row, periodic in l, built without an L x K int64 temp.
    base = (torch.arange(D, device=dev)[:, None] + torch.arange(K, device=dev)) % D
    indices = base.to(torch.int16).repeat(L // D + 1, 1)[:L]
    grad_out = torch.randn(B, L, device=dev, dtype=torch.bfloat16, generator=gen)
    lo = L - 300
    # The oracle: float64 of the bf16 inputs (the last 300 rows).
    tail = (x.double(), weight[lo:].double(), indices[lo:], bias[lo:].double())
    g_tail = grad_out[:, lo:].double()

    out = ff.fixed_fanin_forward_triton(x, weight, indices, bias)
    assert_close(out[:, lo:], ffr.fixed_fanin_forward_reference(*tail), LOW_PRECISION_TOL, "out tail")
    del out

    _, grad_w, grad_b = ff.fixed_fanin_backward_triton(
        grad_out, x, weight, indices, None, None, False, True, True
    )
    _, gw_ref, gb_ref = ffr.fixed_fanin_backward_reference(g_tail, *tail[:3], False)
    assert_close(grad_w[lo:], gw_ref, LOW_PRECISION_TOL, "grad_w tail")
    assert_close(grad_b[lo:], gb_ref, LOW_PRECISION_TOL, "grad_b tail")
    del grad_w, grad_b

    # The input gradient of the last rows only: a CSC of their slots, shifted to their (> 2**31) flat ids.
    col_ptr, slots = fc.column_transpose(indices[lo:], D)
    slots = slots.long() + lo * K
    grad_x, _, _ = ff.fixed_fanin_backward_triton(
        grad_out, x, weight, indices, col_ptr, slots, True, False, False
    )
    gx_ref, _, _ = ffr.fixed_fanin_backward_reference(g_tail, *tail[:3], True, False, False)
    assert_close(grad_x, gx_ref, LOW_PRECISION_TOL, "grad_x tail")
