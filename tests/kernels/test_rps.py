"""Randomized parameter sharing: the mappings, the Triton kernels (interpreted on CPU), the reference twin and
the classifier, against a dense float64 oracle that materializes the mapped weight and uses autograd."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xmc.kernels.rps as rps  # noqa: E402  (after TRITON_INTERPRET)
import xmc.kernels.rps_mapping as rm  # noqa: E402
import xmc.kernels.rps_reference as rr  # noqa: E402
from xmc.kernels.hashing import hash_keys  # noqa: E402

import xmc.classifiers.chunked as chunked  # noqa: E402
from xmc.classifiers.rps import RPSClassifier  # noqa: E402
from xmc.losses import Positives, dense_loss  # noqa: E402
from xmc.memory.bytes import logits_bytes  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Where the Triton tests run: compiled on CUDA, else interpreted on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2
# A layer shard: rows 11..80 of a 90-label layer, D = 40, m = 997 (prime: it divides nothing), tiles (8, 16)
# so tile rows and columns both end short.
B, N, D, OFFSET, TOTAL, M, TILE = 5, 70, 40, 11, 90, 997, (8, 16)
SCALE = 0.3


def mapping(method: str, sign: bool = True, size: int = M, total: int = TOTAL) -> rm.RPSMapping:
    return rm.RPSMapping(method, size, total, D, seed=7, sign=sign, tile=TILE)


def inputs(dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x, array, bias, grad_out = (
        torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        for shape in ((B, D), (M,), (N,), (B, N))
    )
    return x, array, bias, grad_out


def dense_oracle(mp, x, array, bias, grad_out, row_start=OFFSET, scale=SCALE):
    """(out, grad_x, grad_array, grad_bias) in float64 from the materialized weight, by autograd."""
    slots, signs = rm.rps_slots(mp, torch.arange(row_start, row_start + grad_out.shape[1]), torch.arange(D))
    xd, a, b = (t.detach().cpu().double().requires_grad_() for t in (x, array, bias))
    out = xd @ (scale * signs.double() * a[slots]).T + b
    out.backward(grad_out.cpu().double())
    return out.detach(), xd.grad, a.grad, b.grad


@pytest.fixture
def interpreted():
    if not torch.cuda.is_available() and TRITON_IMPORTED_COMPILED:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)")


@pytest.fixture
def poisoned(interpreted, monkeypatch):
    """Every fully-written Triton output starts invalid (NaN, slot -1, sign 0), so an element a kernel never
    writes shows up."""

    def invalid(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 0 if dtype == torch.int8 else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    for module in (rps, rm):  # the kernels, and the mapping kernel
        monkeypatch.setattr(module, "new_output", invalid)


# ----------------------------------------------------------------------------------------------------------
# Kernels against the dense oracle
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("sign", [True, False])
@pytest.mark.parametrize("method", rm.METHODS)
def test_triton_matches_dense(method, sign, poisoned):
    mp = mapping(method, sign)
    x, array, bias, grad_out = inputs(device=DEVICE)
    want = dense_oracle(mp, x, array, bias, grad_out)
    out = rps.rps_forward_triton(x, array, bias, mp, row_start=OFFSET, num_rows=N, scale=SCALE)
    grads = rps.rps_backward_triton(grad_out, x, array, mp, row_start=OFFSET, scale=SCALE, grad_scale=SCALE)
    for got, ref, what in zip((out, *grads), want, ("out", "grad_x", "grad_array", "grad_bias"), strict=True):
        assert got.dtype == torch.float32, what
        assert_close(got, ref, FP32_TOL, what)


@needs_triton
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        # Triton's interpreter computes bf16 tl.dot wrongly (garbage of order 1e10, triton 3.9); fp16 takes
        # the same code path on CPU.
        pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, needs_cuda]),
    ],
)
def test_triton_low_precision_activations(dtype, poisoned):
    """Half-precision activations and logit gradients (autocast style) with an fp32 array: half-precision
    dots, fp32 sums."""
    mp = mapping("stable")
    x, array, bias, grad_out = inputs(device=DEVICE)
    x, grad_out = x.to(dtype), grad_out.to(dtype)
    want = dense_oracle(mp, x, array, bias, grad_out)
    out = rps.rps_forward_triton(x, array, bias, mp, row_start=OFFSET, num_rows=N, scale=SCALE)
    grads = rps.rps_backward_triton(grad_out, x, array, mp, row_start=OFFSET, scale=SCALE, grad_scale=SCALE)
    assert out.dtype == grads[0].dtype == dtype
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for got, ref, what in zip((out, *grads), want, ("out", "grad_x", "grad_array", "grad_bias"), strict=True):
        assert_close(got, ref, LOW_PRECISION_TOL, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", rm.METHODS)
def test_reference_matches_dense(method, dtype):
    mp = mapping(method)
    x, array, bias, grad_out = inputs(dtype)
    want = dense_oracle(mp, x, array, bias, grad_out)
    tol = FP32_TOL if dtype == torch.float32 else 1e-12
    cache = rm.RPSTableCache(mp, OFFSET - 3, N + 5)  # covers the rows: the table comes from the cache
    results = []
    for c in (None, cache):
        out = rr.rps_forward_reference(x, array, bias, mp, row_start=OFFSET, num_rows=N, scale=SCALE, cache=c)
        grads = rr.rps_backward_reference(
            grad_out, x, array, mp, row_start=OFFSET, scale=SCALE, grad_scale=SCALE, cache=c
        )
        for got, ref, what in zip((out, *grads), want, ("out", "gx", "ga", "gb"), strict=True):
            assert got.dtype == dtype, what
            assert_close(got, ref, tol, what)
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)  # cached and hashed tables are the same table
    assert torch.equal(cache.rows(OFFSET, OFFSET + N), rm.rps_table(mp, OFFSET, N))


def test_reference_chunks(monkeypatch):
    """A tiny chunk budget (several chunks, a short last one) gives the same result."""
    mp = mapping("stable")
    x, array, bias, grad_out = inputs(torch.float64)
    want = dense_oracle(mp, x, array, bias, grad_out)
    monkeypatch.setattr(rr, "REFERENCE_CHUNK_ELEMENTS", 9 * D)  # 9 labels a chunk: 8 chunks, the last has 7
    monkeypatch.setattr(rm, "_HASH_CHUNK_ELEMENTS", 4 * D)
    out = rr.rps_forward_reference(x, array, bias, mp, row_start=OFFSET, num_rows=N, scale=SCALE)
    grads = rr.rps_backward_reference(grad_out, x, array, mp, row_start=OFFSET, scale=SCALE, grad_scale=SCALE)
    for got, ref, what in zip((out, *grads), want, ("out", "gx", "ga", "gb"), strict=True):
        assert_close(got, ref, 1e-12, what)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_function_autograd_and_grad_scale(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted")
    mp = mapping("roast")
    x, array, bias, grad_out = inputs(device=DEVICE if backend == "triton" else "cpu")
    _, gx_ref, ga_ref, gb_ref = dense_oracle(mp, x, array, bias, grad_out)
    x, array, bias = (t.clone().requires_grad_() for t in (x, array, bias))
    out = rps.rps_linear(x, array, bias, mp, row_start=OFFSET, num_rows=N, scale=SCALE, grad_scale=2.5,
                         backend=backend)  # fmt: skip
    out.backward(grad_out)
    assert_close(x.grad, gx_ref, FP32_TOL, "grad_x")
    assert_close(array.grad, ga_ref * 2.5 / SCALE, FP32_TOL, "grad_array")  # grad_scale replaces scale
    assert_close(bias.grad, gb_ref, FP32_TOL, "grad_bias")


def test_gradcheck_reference():
    mp = rm.RPSMapping("stable", 23, 9, 6, seed=1, tile=(4, 4))
    gen = torch.Generator().manual_seed(0)
    x, array, bias = (
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in [(3, 6), (23,), (7,)]
    )

    def fn(x, array, bias):
        return rps.rps_linear(x, array, bias, mp, row_start=2, num_rows=7, scale=0.7, backend="reference")

    assert torch.autograd.gradcheck(fn, (x, array, bias))


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto picked Triton for CPU tensors")

    monkeypatch.setattr(rps, "rps_forward_triton", refuse)
    monkeypatch.setattr(rps, "rps_backward_triton", refuse)
    x, array, bias, grad_out = inputs()
    x.requires_grad_()
    rps.rps_linear(x, array, bias, mapping("hashednet"), row_start=OFFSET, num_rows=N).backward(grad_out)
    assert x.grad is not None
    with pytest.raises(ValueError, match="backend"):
        rps.rps_forward(x, array, bias, mapping("stable"), row_start=0, num_rows=N, scale=1.0, backend="gpu")


# ----------------------------------------------------------------------------------------------------------
# The mappings
# ----------------------------------------------------------------------------------------------------------


def _spec_slot_and_sign(mp: rm.RPSMapping, label: int, d: int) -> tuple[int, int]:
    """The mapping of one weight as the module docstring defines it, in plain Python integers."""

    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    def fold(state, key):
        return mix32(((state ^ (key & 0xFFFFFFFF)) + 0x9E3779B9) & 0xFFFFFFFF)

    seed_slot, seed_sign = (int(hash_keys(mp.seed, rm._SALTS[k])) for k in (mp.method, "sign"))
    m, (tl_, td), L, D_ = mp.size, mp.tile, mp.num_labels, mp.in_features
    if mp.method == "hashednet":
        slot = fold(fold(seed_slot, label), d) % m
    elif mp.method == "roast":
        slot = (fold(fold(seed_slot, label // tl_), d // td) % m + label % tl_ * td + d % td) % m
    else:
        height, width = min(tl_, L - label // tl_ * tl_), min(td, D_ - d // td * td)
        v = label // tl_ * tl_ * D_ + height * (d // td * td) + label % tl_ * width + d % td
        slot = (v % m + fold(seed_slot, v // m) % m) % m
    bit = fold(fold(seed_sign, label), d // 32) >> (d % 32) & 1
    return slot, (-1 if bit and mp.sign else 1)


@pytest.mark.parametrize("method", rm.METHODS)
def test_torch_mapping_follows_the_spec(method):
    mp = rm.RPSMapping(method, 61, TOTAL, D, seed=5, tile=TILE)  # m = 61 < L * D: stable folds 59 pieces
    rows = torch.arange(TOTAL - 12, TOTAL)  # the last, short tile row
    slots, signs = rm.rps_slots(mp, rows, torch.arange(D))
    want = [[_spec_slot_and_sign(mp, int(r), d) for d in range(D)] for r in rows]
    assert slots.tolist() == [[s for s, _ in row] for row in want]
    assert signs.tolist() == [[g for _, g in row] for row in want]
    other, _ = rm.rps_slots(dataclasses.replace(mp, seed=6), rows, torch.arange(D))
    assert not torch.equal(other, slots)  # the seed matters


@needs_triton
@pytest.mark.parametrize("sign", [True, False])
@pytest.mark.parametrize("method", rm.METHODS)
def test_triton_mapping_equals_torch(method, sign, poisoned):
    for mp, start, rows in (
        (mapping(method, sign), OFFSET, N),
        # label ids beyond 2**31 and a virtual position beyond 2**32 (int64 paths, uint32 wrap-around)
        (rm.RPSMapping(method, 12_345, 2**31 + 100, D, seed=2**40 + 3, sign=sign), 2**31 + 5, 37),
    ):
        slots, signs = rm.rps_slots_triton(mp, start, rows, device=DEVICE)
        slots, signs = slots.cpu(), signs.cpu()
        want_slots, want_signs = rm.rps_slots(mp, torch.arange(start, start + rows), torch.arange(D))
        assert torch.equal(slots, want_slots)
        assert torch.equal(signs, want_signs)
        assert int(slots.min()) >= 0 and int(slots.max()) < mp.size
    if sign:
        assert 0.3 < float((signs < 0).float().mean()) < 0.7


@pytest.mark.parametrize("tile", [(8, 16), (32, 64)])
@pytest.mark.parametrize("init_scale", [0.125, 1.0])
def test_stable_compression_one_recovers_dense(tile, init_scale):
    clf = RPSClassifier(D, N, method="stable", compression=1, init_scale=init_scale, tile=tile, seed=3)
    assert clf.size == N * D
    assert torch.equal(clf.slot_counts(), torch.ones(N * D, dtype=torch.int64))  # a bijection
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(N, D, generator=gen)
    clf.load_dense(weight)
    assert torch.equal(clf.materialize(), weight)
    with torch.no_grad():
        clf.bias.normal_(generator=gen)
    h = torch.randn(B, D, generator=gen)
    torch.testing.assert_close(clf(h), F.linear(h, weight, clf.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compression", [2, 5, 8])
def test_stable_integer_compression_fills_every_slot_equally(compression):
    clf = RPSClassifier(D, 64, method="stable", compression=compression, tile=TILE)  # L * D = 2560
    assert clf.size * compression == 64 * D
    assert torch.equal(clf.slot_counts(), torch.full((clf.size,), compression))


def test_roast_tiles_are_contiguous_runs():
    m, (tl_, td) = 97, TILE  # m below a tile's size: runs wrap around the array
    clf = RPSClassifier(D, N, method="roast", size=m, tile=TILE, label_offset=OFFSET, total_labels=TOTAL)
    rows, cols = torch.arange(OFFSET, OFFSET + N), torch.arange(D)
    slots, _ = rm.rps_slots(clf.mapping, rows, cols)
    within = (rows % tl_ * td)[:, None] + (cols % td)[None, :]  # i * TD + j
    start = (slots - within) % m  # the tile's offset, for every weight
    tile_id = (rows // tl_)[:, None] * 1000 + (cols // td)[None, :]
    for t in tile_id.unique():
        assert start[tile_id == t].unique().numel() == 1
    assert start.unique().numel() > 1  # tiles start at different offsets


def test_hashednet_counts():
    clf = RPSClassifier(D, N, method="hashednet", size=M, label_offset=OFFSET, total_labels=TOTAL)
    counts = clf.slot_counts()
    assert counts.dtype == torch.int64 and counts.shape == (M,)
    assert int(counts.sum()) == N * D
    assert int(counts.max()) < 4 * N * D / M  # spread, not piled up (mean 2.8)


@pytest.mark.parametrize("init_scale", [0.01, 1.0])
@pytest.mark.parametrize("method", rm.METHODS)
def test_initial_std(method, init_scale):
    clf = RPSClassifier(64, 300, method=method, compression=4, init_scale=init_scale, seed=5)
    std = float(clf.materialize().std())
    assert abs(std / init_scale - 1) < 0.05, std
    assert not clf.bias.any()


def test_default_init_scale():
    clf = RPSClassifier(D, N, compression=4)
    assert clf.init_scale == pytest.approx(1 / math.sqrt(D))
    # The array starts at the weights' std (scale 1): AdamW's steps in weight space are then ~lr.
    assert clf.array_std == clf.init_scale and clf.scale == 1.0


# ----------------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------------


def _positives() -> Positives:
    return Positives.from_lists([[0, 5], [], [69], [1, 2, 3, 40], [7]], N)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("method", rm.METHODS)
def test_classifier_loss_matches_dense(method, backend, monkeypatch, request):
    if backend == "triton":
        request.getfixturevalue("interpreted")
        monkeypatch.setattr(rps, "use_triton", lambda backend, x, array: True)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", B * 16)  # 16 labels a chunk: 5 chunks, the last has 6
    device = DEVICE if backend == "triton" else "cpu"
    clf = RPSClassifier(
        D, N, method=method, size=M, tile=TILE, seed=4, label_offset=OFFSET, total_labels=TOTAL, array_std=1.0
    )  # array_std 1: a scale of 1 / sqrt(D), so the gradient division is visible
    with torch.no_grad():
        clf.bias.normal_(generator=torch.Generator().manual_seed(2))
    clf.to(device)
    h = torch.randn(B, D, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    loss = clf.loss(h, _positives().to(device), "bce")
    loss.backward()

    slots, signs = rm.rps_slots(clf.mapping, torch.arange(OFFSET, OFFSET + N), torch.arange(D))
    hd, a, b = (t.detach().cpu().double().requires_grad_() for t in (h, clf.array, clf.bias))
    want = dense_loss(hd @ (clf.scale * signs * a[slots]).T + b, _positives(), "bce")
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-6
    assert_close(h.grad, hd.grad, FP32_TOL, "grad_h")
    assert_close(clf.bias.grad, b.grad, FP32_TOL, "grad_bias")
    # STABLE-RPS divides the true array gradient by scale**2; the others report it as is.
    divisor = clf.scale**2 if method == "stable" else 1.0
    assert_close(clf.array.grad, a.grad / divisor, FP32_TOL, "grad_array")


def test_stable_grad_scaling():
    """The scaled gradient is the unscaled one over scale**2 and makes an SGD step in weight space
    independent of the initialization scale; the unscaled step grows with scale**2."""
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    positives = Positives.from_lists([[0], [3, 7], [], [29]], 30)

    def build(scale, stable_grad):
        clf = RPSClassifier(16, 30, compression=3, init_scale=scale, array_std=1.0, stable_grad=stable_grad,
                            tile=(8, 8), seed=9, dtype=torch.float64)  # fmt: skip
        with torch.no_grad():  # the same W for every scale: array = A0 / scale
            clf.array.copy_(
                torch.randn(clf.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            )
            clf.array /= scale
        return clf

    def step(clf):
        before = clf.materialize()
        clf.loss(h, positives).backward()
        torch.optim.SGD(clf.parameters(), lr=0.1).step()
        return clf.materialize() - before

    scaled, unscaled = build(0.01, True), build(0.01, False)
    torch.testing.assert_close(scaled.materialize(), build(1.0, True).materialize(), rtol=1e-12, atol=0)
    for clf in (scaled, unscaled):
        clf.loss(h, positives).backward()
    torch.testing.assert_close(scaled.array.grad * 0.01**2, unscaled.array.grad, rtol=1e-10, atol=0)

    small, large = step(build(0.01, True)), step(build(1.0, True))
    assert float(large.abs().max()) > 1e-4
    torch.testing.assert_close(small, large, rtol=1e-6, atol=1e-12)
    small, large = step(build(0.01, False)), step(build(1.0, False))
    torch.testing.assert_close(large, small * (1.0 / 0.01) ** 2, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", rm.METHODS)
def test_shards_cover_the_labels(method):
    whole = RPSClassifier(D, N, method=method, size=M, tile=TILE, seed=2)
    with torch.no_grad():
        whole.array.normal_(generator=torch.Generator().manual_seed(0))
        whole.bias.normal_(generator=torch.Generator().manual_seed(1))
    h = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    parts = [whole.shard(rank, 3) for rank in range(3)]
    assert [p.label_offset for p in parts] == [0, 24, 47] and sum(p.num_labels for p in parts) == N
    for p in parts:
        assert torch.equal(p.array, whole.array) and p.size == M and p.total_labels == N
        lo = p.label_offset
        assert torch.equal(p.materialize(), whole.materialize(lo, lo + p.num_labels))
    torch.testing.assert_close(torch.cat([p(h) for p in parts], dim=1), whole(h), rtol=1e-6, atol=1e-6)
    assert torch.equal(sum(p.slot_counts() for p in parts), whole.slot_counts())
    _, ids = parts[2].topk(h, 4)
    assert int(ids.min()) >= 47  # global label ids


def test_table_cache_follows_the_mapping_and_rows():
    clf = RPSClassifier(D, 30, size=M, tile=TILE, label_offset=20, total_labels=N)
    cpu = torch.device("cpu")
    cache = clf._table_cache(cpu)
    assert clf._table_cache(cpu) is cache
    assert torch.equal(cache.rows(23, 29), rm.rps_table(clf.mapping, 23, 6))
    clf.label_offset = 0  # rows the cache does not hold: a new cache
    assert clf._table_cache(cpu) is not cache
    cache = clf._table_cache(cpu)
    clf.mapping = dataclasses.replace(clf.mapping, seed=8)  # another mapping: a new cache
    assert clf._table_cache(cpu) is not cache
    assert not any("cache" in key for key in clf.state_dict())


def test_state_bytes(monkeypatch):
    got = RPSClassifier.state_bytes(D, N, batch_size=5, size=M)
    params = M + N
    assert got == {
        "weights": 4 * params,
        "master_weights": 0,
        "gradients": 4 * params,
        "optimizer": 8 * params,  # AdamW: two fp32 moments
        "workspace": 4 * N * D,  # one label chunk (all 70 labels) of fp32 weights; its array grad is the grad
        "logits": logits_bytes(N, 5),
        "chunk_gradient": 0,  # one chunk: its bias gradient is the whole gradient
    }
    m = math.ceil(N * D / 8)
    half = RPSClassifier.state_bytes(D, N, batch_size=5, optimizer="sgd", param_bytes=2, master_weights=True,
                                     bias=False, compression=8)  # fmt: skip
    assert half["weights"] == half["gradients"] == 2 * m
    assert half["master_weights"] == half["optimizer"] == 4 * m  # fp32 copy; one fp32 momentum
    assert half["workspace"] == 4 * N * D + 4 * m  # the fp32 buffer before its cast (the gradient)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 5 * 16)  # 16 labels a chunk
    chunked_bytes = RPSClassifier.state_bytes(D, N, batch_size=5, param_bytes=2, size=M)
    assert chunked_bytes["workspace"] == 4 * 16 * D + 4 * M + 2 * M
    assert chunked_bytes["chunk_gradient"] == 16 * 2  # a chunk's bias rows
    # Apart from the bias, parameters, gradients and optimizer state depend on m alone, not on L * D.
    small = RPSClassifier.state_bytes(768, 1_000, batch_size=64, size=10_000, bias=False)
    large = RPSClassifier.state_bytes(768, 1_000_000, batch_size=64, size=10_000, bias=False)
    for key in ("weights", "gradients", "optimizer", "master_weights"):
        assert small[key] == large[key], key
    with_bias = RPSClassifier.state_bytes(768, 1_000_000, batch_size=64, size=10_000)
    assert with_bias["weights"] - large["weights"] == 4 * 1_000_000
    clf = RPSClassifier(D, N, method="roast", compression=8, bias=False)
    assert clf.memory(batch_size=5, optimizer="sgd") == RPSClassifier.state_bytes(
        D, N, batch_size=5, optimizer="sgd", bias=False, method="roast", size=m
    )


def test_clear_errors():
    with pytest.raises(ValueError, match="exactly one of size"):
        RPSClassifier(D, N)
    with pytest.raises(ValueError, match="exactly one of size"):
        RPSClassifier(D, N, size=10, compression=2)
    with pytest.raises(ValueError, match="exactly one of size"):
        RPSClassifier.state_bytes(D, N)
    with pytest.raises(ValueError, match="method must be one of"):
        RPSClassifier(D, N, method="lsh", size=10)
    with pytest.raises(ValueError, match="init_scale must be positive"):
        RPSClassifier(D, N, size=10, init_scale=0)
    with pytest.raises(ValueError, match="total_labels"):
        RPSClassifier(D, N, size=10, label_offset=30, total_labels=N)
    with pytest.raises(ValueError, match="compression 1"):
        RPSClassifier(D, N, method="stable", compression=2).load_dense(torch.zeros(N, D))
    with pytest.raises(ValueError, match="compression 1"):
        RPSClassifier(D, N, method="roast", compression=1).load_dense(torch.zeros(N, D))
    with pytest.raises(ValueError, match="array must have shape"):
        rr.rps_forward_reference(torch.zeros(2, D), torch.zeros(5), None, mapping("stable"), row_start=0,
                                  num_rows=3, scale=1.0)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", rm.METHODS)
@pytest.mark.parametrize(("Bg", "L"), [(128, 20_011), (37, 4_099)])
def test_gpu_matches_reference(method, dtype, Bg, L, poisoned):
    """Compiled kernels against float64 of the (rounded) inputs; fresh inputs per case, poisoned outputs."""
    Dg = 768
    mp = rm.RPSMapping(method, L * Dg // 8 + 3, L, Dg, seed=1)
    seed = rm.METHODS.index(method) * 4 + 2 * (dtype == torch.bfloat16) + (Bg == 37)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(Bg, Dg, device="cuda", generator=gen).to(dtype)
    array = torch.randn(mp.size, device="cuda", generator=gen)
    bias = torch.randn(L, device="cuda", generator=gen)
    grad_out = torch.randn(Bg, L, device="cuda", generator=gen).to(dtype)
    tol = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL
    kw = dict(row_start=0, scale=0.05)
    out = rps.rps_forward(x, array, bias, mp, num_rows=L, **kw)
    want = rr.rps_forward_reference(x.double(), array.double(), bias.double(), mp, num_rows=L, **kw)
    assert out.dtype == dtype
    assert_close(out, want, tol, "out")
    grads = rps.rps_backward(grad_out, x, array, mp, grad_scale=0.05, **kw)
    wants = rr.rps_backward_reference(
        grad_out.double(), x.double(), array.double(), mp, grad_scale=0.05, **kw
    )
    for got, ref, what in zip(grads, wants, ("gx", "ga", "gb"), strict=True):
        assert_close(got, ref, tol, what)


def test_stable_trains_the_same_weights_for_any_array_scale():
    """Same weights reached through arrays of std 0.01 and 1: STABLE-RPS takes the same SGD step in weight
    space; the unscaled variant's steps differ by the squared ratio of the scale factors (1e4)."""
    h = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    positives = _toy_positives(6, 30)
    steps = {}
    for stable in (True, False):
        for array_std in (0.01, 1.0):
            clf = RPSClassifier(
                16,
                30,
                compression=3,
                init_scale=0.25,
                array_std=array_std,
                stable_grad=stable,
                tile=(8, 8),
                seed=2,
            )
            assert abs(float(clf.array.detach().std()) / array_std - 1) < 0.1
            before = clf.materialize().detach().clone()
            assert abs(float(before.std()) / 0.25 - 1) < 0.1
            optimizer = torch.optim.SGD([clf.array], lr=0.5, momentum=0.9)
            clf.loss(h, positives, "bce").backward()
            optimizer.step()
            steps[stable, array_std] = clf.materialize().detach() - before
    torch.testing.assert_close(steps[True, 0.01], steps[True, 1.0], rtol=1e-4, atol=1e-7)
    ratio = steps[False, 0.01].norm() / steps[False, 1.0].norm()
    assert ratio == pytest.approx(1e4, rel=1e-3)


def _toy_positives(rows: int, labels: int):
    from xmc.losses import Positives

    return Positives.from_lists([[r % labels, (3 * r + 1) % labels] for r in range(rows)], labels)
