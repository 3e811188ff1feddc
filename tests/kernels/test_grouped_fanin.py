"""Grouped fan-in (labels in groups of G share one id row): kernels, reference twin, layer, classifier, SET.

Every result is checked against a dense float64 computation with the group's ids repeated per label. Without
CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` (set in conftest) on small odd shapes; their outputs
start NaN-filled, so an element a kernel never writes fails.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import xmc.kernels.fanin_common as fc
import xmc.kernels.fixed_fanin as ff
import xmc.kernels.grouped_fanin as gf
import xmc.kernels.grouped_fanin_reference as gfr
from helpers import assert_close

from xmc.classifiers import FixedFanInClassifier
from xmc.config import SETOptions
from xmc.losses import Positives
from xmc.nn import FixedFanInLinear
from xmc.sparse.dst import SET

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FP32_TOL, LOW_PRECISION_TOL = 1e-5, 1e-2

# (B, D, L, K, G): L not a multiple of G (a short last group), G = 1 (the plain layer), G above 16 (two tl.dot
# tiles of labels), K = 1, K above one slot block (64), B over one batch block (128), a single group.
SHAPES = [
    (3, 23, 37, 5, 4),
    (5, 40, 64, 16, 16),
    (2, 11, 9, 3, 1),
    (4, 30, 50, 7, 20),
    (1, 9, 5, 1, 3),
    (6, 90, 33, 70, 8),
    (130, 20, 24, 3, 16),
]
SHAPE_IDS = [f"B{b}-D{d}-L{n}-K{k}-G{g}" for b, d, n, k, g in SHAPES]


def random_grouped(B, D, L, K, G, dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """(x, weight, group ids, bias, grad_out), ids distinct per row (the first K of a permutation)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(L, K, generator=gen, dtype=torch.float64)
    ids = torch.argsort(torch.rand(gf.num_groups(L, G), D, generator=gen), dim=1)[:, :K].to(torch.int16)
    b = torch.randn(L, generator=gen, dtype=torch.float64) if bias else None
    grad_out = torch.randn(B, L, generator=gen, dtype=torch.float64)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cast(x), cast(weight), ids.to(device), cast(b), cast(grad_out)


def dense_oracle(x, weight, ids, G, bias, grad_out):
    """(out, grad_x, grad_w, grad_b) in float64 from the dense (L, D) weight."""
    x, w, g = x.double(), weight.double(), grad_out.double()
    label_ids = ids.long().repeat_interleave(G, 0)[: w.shape[0]]
    dense = torch.zeros(w.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    dense.scatter_(1, label_ids, w)
    out = x @ dense.T + (0 if bias is None else bias.double())
    return out, g @ dense, (g.T @ x).gather(1, label_ids), g.sum(0)


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton output starts as NaN."""

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (gf, ff, fc):
        monkeypatch.setattr(module, "new_output", nan_output)


# ----------------------------------------------------------------------------------------------------------
# Reference twin and Triton kernels
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reference_matches_dense(shape, monkeypatch):
    B, D, L, K, G = shape
    monkeypatch.setattr(gfr, "REFERENCE_CHUNK_ELEMENTS", 2 * B * max(K, G))  # two groups a chunk
    x, w, ids, b, g = random_grouped(B, D, L, K, G, dtype=torch.float64, device="cpu")
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(x, w, ids, G, b, g)
    assert_close(gfr.grouped_fanin_forward_reference(x, w, ids, G, b), out_ref, 1e-12, "out")
    grads = gfr.grouped_fanin_backward_reference(g, x, w, ids, G)
    for got, want, what in zip(grads, (gx_ref, gw_ref, gb_ref), ("gx", "gw", "gb"), strict=True):
        assert_close(got, want, 1e-12, what)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_matches_dense(shape, poisoned):
    B, D, L, K, G = shape
    x, w, ids, b, g = random_grouped(B, D, L, K, G)
    out_ref, gx_ref, gw_ref, gb_ref = dense_oracle(x, w, ids, G, b, g)
    out = gf.grouped_fanin_forward_triton(x, w, ids, G, b)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, FP32_TOL, "out")
    transpose = fc.column_transpose(ids, D)
    grads = gf.grouped_fanin_backward_triton(g, x, w, ids, G, *transpose)
    for got, want, what in zip(grads, (gx_ref, gw_ref, gb_ref), ("gx", "gw", "gb"), strict=True):
        assert_close(got, want, FP32_TOL, what)


@needs_triton
def test_triton_group_of_one_is_the_plain_layer(poisoned):
    x, w, ids, b, _ = random_grouped(4, 21, 30, 6, 1)
    want = ff.fixed_fanin_forward_triton(x, w, ids, b)
    assert_close(gf.grouped_fanin_forward_triton(x, w, ids, 1, b), want, FP32_TOL, "out")


@needs_triton
@pytest.mark.parametrize("buffer_bytes", [2**25, 3 * 5 * 3 * 4], ids=["one-range", "ranges-of-3-groups"])
def test_triton_input_gradient_of_a_label_block(poisoned, monkeypatch, buffer_bytes):
    """Labels 8..34 of 37 (G = 4) through the whole layer's transpose, in ranges of groups and split
    parts, equal the block's own dense gradient; a block off a group boundary is refused."""
    monkeypatch.setattr(gf, "GROUP_BUFFER_BYTES", buffer_bytes)
    monkeypatch.setattr(fc, "BWD_X_SPLIT_SLOTS", 1)
    x, w, ids, _, g = random_grouped(3, 13, 37, 5, 4, seed=3)
    label_ids = ids.long().repeat_interleave(4, 0)[:37]
    dense = torch.zeros(37, 13, dtype=torch.float64).scatter_(1, label_ids.cpu(), w.double().cpu())
    want = g[:, 8:35].double().cpu() @ dense[8:35]
    transpose = fc.column_transpose(ids, 13)
    got = gf.grouped_fanin_input_gradient_triton(g[:, 8:35], x, w, 4, *transpose, row_start=8)
    assert_close(got, want, FP32_TOL, "grad_x of labels 8..34")
    with pytest.raises(ValueError, match="multiple of G"):
        gf.grouped_fanin_input_gradient_triton(g[:, 6:30], x, w, 4, *transpose, row_start=6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype, poisoned):
    """Low-precision operands on tensor-core products, fp32 accumulation: within 1e-2 of float64."""
    x, w, ids, b, g = random_grouped(5, 37, 70, 9, 16, dtype=dtype)
    oracle = dense_oracle(x, w, ids, 16, b, g)
    out = gf.grouped_fanin_forward_triton(x, w, ids, 16, b)
    grads = gf.grouped_fanin_backward_triton(g, x, w, ids, 16, *fc.column_transpose(ids, 37))
    for got, want, what in zip((out, *grads), oracle, ("out", "gx", "gw", "gb"), strict=True):
        assert got.dtype == dtype, what
        assert_close(got, want, LOW_PRECISION_TOL, what)


@needs_triton
def test_triton_mixed_dtypes_round_weights_like_autocast(poisoned):
    """bf16 activations with fp32 weights: the products take the weights in bf16 (as autocast's dense
    layer does), so the result matches float64 of the bf16-rounded weights closely."""
    x, w, ids, b, g = random_grouped(4, 31, 45, 7, 8)
    x, g = x.bfloat16(), g.bfloat16()
    out_ref, gx_ref, gw_ref, _ = dense_oracle(x, w.bfloat16(), ids, 8, b, g)
    out = gf.grouped_fanin_forward_triton(x, w, ids, 8, b)
    grad_x, grad_w, _ = gf.grouped_fanin_backward_triton(g, x, w, ids, 8, *fc.column_transpose(ids, 31))
    assert out.dtype == grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    assert_close(out, out_ref, LOW_PRECISION_TOL, "out")
    assert_close(grad_x, gx_ref, LOW_PRECISION_TOL, "gx")
    assert_close(grad_w, gw_ref, LOW_PRECISION_TOL, "gw")


def test_shape_errors():
    x, w, ids, b, _ = random_grouped(2, 10, 9, 3, 4, device="cpu")
    with pytest.raises(ValueError, match=r"indices \(ceil\(L / G\), K\) with G = 4, got \(9, 3\) and \(2"):
        gfr.grouped_fanin_forward_reference(x, w, ids[:2], 4, b)
    with pytest.raises(ValueError, match="group must be a positive"):
        gfr.grouped_fanin_forward_reference(x, w, ids, 0, b)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_function_gradients(backend, poisoned):
    """The autograd function: gradients to x, weight and bias as the dense layer's."""
    x, w, ids, b, g = random_grouped(3, 17, 22, 4, 5)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = gf.grouped_fanin(leaves[0], leaves[1], ids, 5, leaves[2], backend=backend)
    grads = torch.autograd.grad(out, leaves, g)
    oracle = dense_oracle(x, w, ids, 5, b, g)
    assert_close(out, oracle[0], FP32_TOL, "out")
    for got, want, what in zip(grads, oracle[1:], ("gx", "gw", "gb"), strict=True):
        assert_close(got, want, FP32_TOL, what)


# ----------------------------------------------------------------------------------------------------------
# Layer, classifier, SET
# ----------------------------------------------------------------------------------------------------------


def test_layer_shapes_ids_and_dense_view():
    layer = FixedFanInLinear(30, 37, 6, group=4, seed=2)
    assert layer.indices.shape == (10, 6) and layer.weight.shape == (37, 6)
    assert all(len(set(row.tolist())) == 6 for row in layer.indices)
    x = torch.randn(3, 30)
    assert_close(layer(x), x @ layer.to_dense().T + layer.bias, 1e-5, "layer vs dense view")
    assert torch.equal(layer.label_ids(5, 9), layer.indices[[1, 1, 1, 2]])
    # A shard's ids are the whole layer's group rows: ids hash the global group number.
    shard = FixedFanInLinear(30, 12, 6, group=4, seed=2, row_offset=8)
    assert torch.equal(shard.indices, layer.indices[2:5])
    assert torch.equal(shard.weight, layer.weight[8:20])
    with pytest.raises(ValueError, match="divide row_offset"):
        FixedFanInLinear(30, 12, 6, group=4, row_offset=6)


def test_layer_from_dense_keeps_each_groups_strongest_columns():
    weight = torch.zeros(5, 8)
    weight[0, 3], weight[1, 6], weight[1, 3] = 1.0, 5.0, 0.5  # group 0: columns 6 (5.0) and 3 (1.5)
    weight[4, 2], weight[4, 7] = -2.0, 1.0  # group 2 (a single label)
    layer = FixedFanInLinear.from_dense(weight, 2, group=2)
    assert layer.indices[0].tolist() == [3, 6] and layer.indices[2].tolist() == [2, 7]
    assert layer.weight[1].tolist() == [0.5, 5.0]


@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)])
def test_classifier_chunked_loss(loss, triton_path, poisoned, monkeypatch):
    """The label-chunked loss of a grouped classifier (chunks on group boundaries) against autograd
    through the dense view of the same weights."""
    import xmc.classifiers.chunked as chunked
    import xmc.classifiers.fixed_fanin as clf_module

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 11)  # 11 labels a chunk -> 8 (two groups of 4)
    on = (lambda backend, x, weight: True) if triton_path else (lambda backend, x, weight: False)
    monkeypatch.setattr(gf, "use_triton", on)
    monkeypatch.setattr(clf_module, "use_triton", on)
    clf = FixedFanInClassifier(19, 41, 5, seed=3, group=4)
    assert clf.label_chunk(4) == 8
    positives = Positives.from_lists([[0, 5], [], [40, 12], [1, 2, 3, 20]], 41)
    h = torch.randn(4, 19, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = clf.loss(h, positives, loss)
    got = torch.autograd.grad(value, [h, clf.layer.weight, clf.layer.bias])

    dense = clf.layer.to_dense().detach().requires_grad_(True)
    bias = clf.layer.bias.detach().clone().requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    logits = h2 @ dense.T + bias
    target = torch.zeros(4, 41)
    for row, labels in enumerate([[0, 5], [], [40, 12], [1, 2, 3, 20]]):
        target[row, labels] = 1
    if loss == "bce":
        want_value = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    else:
        want_value = (torch.relu(1 - (2 * target - 1) * logits) ** 2).mean()
    gh, gdense, gb = torch.autograd.grad(want_value, [h2, dense, bias])
    assert_close(value, want_value, 1e-5, "loss")
    assert_close(got[0], gh, 1e-5, "grad_h")
    assert_close(got[1], gdense.gather(1, clf.layer.label_ids().long()), 1e-5, "grad_w")
    assert_close(got[2], gb, 1e-5, "grad_b")


def test_classifier_memory_counts_group_ids_and_refuses_label_shards():
    plain = FixedFanInClassifier.state_bytes(768, 1000, fan_in=64)
    grouped = FixedFanInClassifier.state_bytes(768, 1000, fan_in=64, group=16)
    assert plain["indices"] == 1000 * 64 * 2 and grouped["indices"] == math.ceil(1000 / 16) * 64 * 2
    assert grouped["weights"] == plain["weights"]
    clf = FixedFanInClassifier(30, 40, 4, group=8)
    assert clf.memory()["indices"] == clf.layer.indices.numel() * 2
    with pytest.raises(ValueError, match="train.parallel=data"):
        clf.shard(0, 2)


def test_set_rewires_whole_groups_by_summed_magnitude():
    """Pruning ranks a group's slots by |w| summed over its labels, zeroes the pruned slot in every label of
    the group, and regrows ids distinct within the group's row."""
    layer = FixedFanInLinear(40, 10, 4, group=4, seed=1)  # groups of 4, 4, 2 labels
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[0:4, 2] = 0.1  # group 0: slot 2 weakest in sum
        layer.weight[0, 1] = 0.05  # ... though label 0 alone has a weaker slot 1
        layer.weight[8:10, 0] = 0.2  # the short last group: slot 0
        layer.weight[4:8, 3] = 0.3  # group 1: slot 3
    before = layer.indices.clone()
    rewire = SET(layer, total_steps=100, config=SETOptions(interval=1, fraction=0.25, floor=0.25))
    changed = rewire.rewire(step=1)
    assert changed == 10  # one slot per group: 4 + 4 + 2 label connections
    pruned = {0: 2, 1: 3, 2: 0}
    for group, slot in pruned.items():
        labels = range(4 * group, min(4 * group + 4, 10))
        assert all(float(layer.weight.detach()[label, slot]) == 0.0 for label in labels)
        kept = [s for s in range(4) if s != slot]
        assert torch.equal(layer.indices[group, kept], before[group, kept])
        assert int(layer.indices[group, slot]) not in before[group].tolist()
        assert len(set(layer.indices[group].tolist())) == 4
    # A single weak label does not decide the group's pruning.
    assert float(layer.weight.detach()[0, 1]) == pytest.approx(0.05)


def test_config_rejects_groups_off_fixed_fanin():
    from xmc.config import ClassifierConfig
    from xmc.model import build_classifier

    with pytest.raises(ValueError, match="classifier.type=fixed_fanin"):
        build_classifier(ClassifierConfig(type="dense", fan_in_group=4), 16, 20, 0)
    with pytest.raises(ValueError, match="at least 1"):
        build_classifier(ClassifierConfig(fan_in_group=0), 16, 20, 0)
    clf = build_classifier(ClassifierConfig(fan_in=4, fan_in_group=4), 16, 20, 0)
    assert clf.group == 4 and clf.layer.indices.shape == (5, 4)


# ----------------------------------------------------------------------------------------------------------
# GPU: compiled kernels
# ----------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(128, 30_011, 64, 16), (37, 9_973, 32, 16), (128, 20_000, 128, 8), (1, 5, 7, 4)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"B{b}-L{n}-K{k}-G{g}" for b, n, k, g in GPU_SHAPES])
def test_gpu_matches_dense(dtype, shape, poisoned):
    B, L, K, G = shape
    seed = GPU_SHAPES.index(shape) * 2 + (dtype == torch.bfloat16)
    x, w, ids, b, g = random_grouped(B, 768, L, K, G, dtype=dtype, seed=seed, device="cuda")
    oracle = dense_oracle(x, w, ids, G, b, g)
    tol = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL
    out = gf.grouped_fanin_forward(x, w, ids, G, b)  # auto: Triton on CUDA
    transpose = fc.column_transpose(ids, 768)
    grads = gf.grouped_fanin_backward(g, x, w, ids, G, *transpose)
    for got, want, what in zip((out, *grads), oracle, ("out", "gx", "gw", "gb"), strict=True):
        assert got.dtype == dtype, what
        assert_close(got, want, tol, what)
    again = gf.grouped_fanin_backward(g, x, w, ids, G, *transpose)
    assert torch.equal(grads[0], again[0])  # no atomics: the same sums in the same order
