"""The Triton draw of distinct ids per row (interpreted on CPU) against the PyTorch loop of fill_distinct."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from xmc.kernels.fill_distinct import fill_distinct_triton  # noqa: E402  (after TRITON_INTERPRET)

from xmc.nn.fixed_fanin import FixedFanInLinear  # noqa: E402
from xmc.sparse import ids as ids_module  # noqa: E402

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (R, K, D, share of slots drawn, avoid the old ids): SET's regrowth shape (K = 128 of 768, a quarter, old ids
# avoided), a full draw (initial ids), K = 1, odd widths and a dense row (K / D near one half).
CASES = [
    (30, 128, 768, 0.25, True),
    (40, 5, 13, 1.0, False),
    (25, 16, 64, 0.25, True),
    (20, 7, 100, 0.5, False),
    (10, 1, 3, 1.0, False),
    (12, 33, 70, 0.6, False),
]


def _case(R, K, D, share, avoid, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.argsort(torch.rand(R, D, generator=gen), dim=1)[:, :K].to(torch.int16)
    fill = torch.rand(R, K, generator=gen) < share
    rows = torch.arange(R) + 2**33 + seed  # global rows above 2**32: both hash halves matter
    return ids, fill, rows, (ids.clone() if avoid else None)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[f"R{r}-K{k}-D{d}" for r, k, d, _, _ in CASES])
def test_kernel_equals_pytorch_loop(case, monkeypatch):
    R, K, D, share, avoid = case
    ids, fill, rows, avoid_ids = _case(*case, seed=CASES.index(case))
    monkeypatch.setattr(ids_module, "_use_kernel", lambda *args: False)
    want = ids_module.fill_distinct(ids, fill, rows, D, (7, 4, 11), avoid=avoid_ids)
    dev = [t.to(DEVICE) if t is not None else None for t in (ids, fill, rows, avoid_ids)]
    got, left = fill_distinct_triton(*dev[:3], D, (7, 4, 11), dev[3], ids_module._MAX_ROUNDS)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), want)
    assert int(left.max()) == 0
    kept = ~fill
    assert torch.equal(got.cpu()[kept], ids.long()[kept])
    assert all(len(set(row.tolist())) == K for row in got.cpu())


@needs_triton
def test_kernel_reports_rows_out_of_rounds():
    """One free column for two drawn slots (D = 2, id 1 kept): never distinct, so the row reports both."""
    ids = torch.tensor([[0, 0, 1]], device=DEVICE)
    fill = torch.tensor([[True, True, False]], device=DEVICE)
    out, left = fill_distinct_triton(
        ids, fill, torch.zeros(1, dtype=torch.int64, device=DEVICE), 3, (1,), None, 5
    )
    assert int(left[0]) == 2
    assert int(out[0, 2]) == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_layer_draws_the_cpu_ids():
    """FixedFanInLinear on CUDA (the kernel) draws the ids the CPU loop draws, and SET regrowth too."""
    from xmc.config import SETOptions
    from xmc.sparse.dst import SET

    layers = [FixedFanInLinear(768, 5_003, 128, device=d, seed=3) for d in ("cpu", "cuda")]
    assert torch.equal(layers[0].indices, layers[1].indices.cpu())
    for layer in layers:
        SET(layer, total_steps=10**6, config=SETOptions(fraction=0.25)).rewire(step=9)
    assert torch.equal(layers[0].indices, layers[1].indices.cpu())
    assert torch.equal(layers[0].weight, layers[1].weight.cpu())


@pytest.mark.parametrize("num_columns", [64, 65, 256])
def test_every_fan_in_from_one_to_the_width_draws(num_columns):
    """Every K in 1..D draws distinct ids: K = D / 2 used to give up after its rejection rounds (a row in
    about a thousand), so the layer could not be built."""
    fan_ins = range(1, num_columns + 1)
    if num_columns > 100:  # every K near one half and a sample of the rest
        fan_ins = sorted({*range(1, num_columns + 1, 15), *range(126, 131), num_columns})
    for fan_in in fan_ins:
        ids = FixedFanInLinear(num_columns, 100, fan_in, bias=False, seed=fan_in).indices.long()
        assert ids.shape == (100, fan_in)
        assert int(ids.min()) >= 0 and int(ids.max()) < num_columns
        ordered = ids.sort(dim=1).values
        assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), (num_columns, fan_in)


def test_half_full_rows_draw_and_do_not_depend_on_their_neighbours():
    """K = D / 2 over many rows (some outlast the rejection rounds and are ranked instead); a row's ids are
    the same whether drawn with all rows or in a slice of them (label shards)."""
    num_rows, num_columns = 2_000, 256
    rows = torch.arange(num_rows, dtype=torch.int64)
    empty = torch.zeros(num_rows, num_columns // 2, dtype=torch.int64)
    every = torch.ones_like(empty, dtype=torch.bool)
    whole = ids_module.fill_distinct(empty, every, rows, num_columns, (5, 1))
    ordered = whole.sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all())
    for part in (slice(0, 7), slice(500, 1300), slice(1990, 2000)):
        assert torch.equal(
            whole[part], ids_module.fill_distinct(empty[part], every[part], rows[part], num_columns, (5, 1))
        )


def test_hash_keys_continues_a_state():
    """The rejection loop hashes the key without the attempt once and folds each attempt into that state."""
    from xmc.kernels.hashing import hash_keys

    rows, slots = torch.arange(5)[:, None] + 2**33, torch.arange(3)[None, :]
    prefix = hash_keys(7, 1, rows, slots)
    for attempt in (0, 1, 2**40):
        assert torch.equal(hash_keys(attempt, state=prefix), hash_keys(7, 1, rows, slots, attempt))
    assert not torch.equal(hash_keys(1, state=prefix), hash_keys(0, state=prefix))
