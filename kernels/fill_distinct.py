"""Distinct random column ids per row: the draw behind a fixed fan-in layer's initial ids and SET regrowth.

For each row r of ``ids (R, K)``, the slots marked in ``fill`` draw new ids in rounds ("attempts"):

    drawn[r, j] = hash(key..., rows[r], j, attempt) mod D        (xmc.kernels.hashing.hash_keys)

A drawn id is kept when it occurs once among the row's K ids and its A ``avoid`` ids; otherwise the slot
draws again in the next attempt. Drawn ids that meet each other all redraw, also one accepted in an
earlier attempt. This is the rejection loop of :func:`xmc.sparse.ids.fill_distinct`, whose PyTorch body is the
reference twin: the kernel gives the same ids bit for bit (the tests check it).

Work and traffic. One program owns one row and keeps it in registers for every attempt. Only the F drawn
slots are compared: each attempt costs F (F + K + A) integer comparisons, and SET's regrowth of a quarter of
K = 128 of D = 768 with the old ids avoided (F = 32, A = 128) needs about 10 attempts, ~1e5 comparisons a
row, all on chip. Device memory sees each input once and each output once, about R K (s_id + 1 + 4 + 8) +
R A s_avoid bytes, against the PyTorch loop's ~20 full-size int64 passes (hash rounds and a row sort) per
attempt.
"""

from __future__ import annotations

import torch
from xmc.kernels._common import jit as _jit
from xmc.kernels._common import require_triton, tl, triton
from xmc.kernels.hashing import fold32, hash_keys

__all__ = ["MAX_BLOCK", "fill_distinct_triton"]

# The kernel holds a row's ids and an (K, K + A) comparison tile in registers: rows wider than this go to
# the PyTorch loop.
MAX_BLOCK = 256


@_jit(do_not_specialize=["prefix", "max_rounds"])
def _fill_distinct_kernel(
    ids_ptr,
    fill_ptr,
    pos_ptr,
    count_ptr,
    avoid_ptr,
    rows_ptr,
    out_ptr,
    left_ptr,
    K,
    A,
    D,
    prefix,
    max_rounds,
    stride_ir,
    stride_fr,
    stride_pr,
    stride_ar,
    stride_or,
    HAS_KEPT: tl.constexpr,
    HAS_AVOID: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    """One program: row r's fill slots (their positions ``pos[r, :count[r]]``) drawn until none repeats;
    writes the row's ids and how many slots are still pending (0 unless ``max_rounds`` ran out).

    Only the F drawn slots are compared, each with the others, the kept ids and the avoided ids; ids
    that must never match are negative (drawn ids are >= 0)."""
    r = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    ids = tl.load(ids_ptr + r * stride_ir + offs_k, mask=mask_k, other=0).to(tl.int64)
    fill = tl.load(fill_ptr + r * stride_fr + offs_k, mask=mask_k, other=0) != 0
    count = tl.load(count_ptr + r)
    offs_f = tl.arange(0, BLOCK_F)
    valid = offs_f < count
    pos = tl.load(pos_ptr + r * stride_pr + offs_f, mask=valid, other=0).to(tl.int64)
    # Hash state after the key prefix (host) and the row's two 32-bit halves, then each slot's two halves.
    row = tl.load(rows_ptr + r).to(tl.int64)
    state = fold32(fold32(prefix.to(tl.uint32), row.to(tl.uint32)), (row >> 32).to(tl.uint32))
    zero = tl.zeros((BLOCK_F,), dtype=tl.uint32)
    slot_state = fold32(fold32(state + zero, pos.to(tl.uint32)), zero)
    if HAS_KEPT:
        kept = tl.where(fill | (offs_k >= K), -1, ids)
    if HAS_AVOID:
        offs_a = tl.arange(0, BLOCK_A)
        avoid = tl.load(avoid_ptr + r * stride_ar + offs_a, mask=offs_a < A, other=-1).to(tl.int64)
    others = offs_f[:, None] != offs_f[None, :]

    drawn = -2 - offs_f.to(tl.int64)  # lanes past count never match anything
    pending = valid
    left = tl.sum(pending.to(tl.int32), axis=0)
    attempt = left * 0  # an int32 scalar
    while (left > 0) & (attempt < max_rounds):
        fresh = fold32(fold32(slot_state, zero + attempt.to(tl.uint32)), zero).to(tl.int64) % D
        drawn = tl.where(pending, fresh, drawn)
        repeated = tl.max(((drawn[:, None] == drawn[None, :]) & others).to(tl.int32), axis=1) > 0
        if HAS_KEPT:
            repeated = repeated | (tl.max((drawn[:, None] == kept[None, :]).to(tl.int32), axis=1) > 0)
        if HAS_AVOID:
            repeated = repeated | (tl.max((drawn[:, None] == avoid[None, :]).to(tl.int32), axis=1) > 0)
        pending = repeated & valid
        left = tl.sum(pending.to(tl.int32), axis=0)
        attempt += 1
    # Kept slots and drawn slots are disjoint addresses: no ordering between the two stores is needed.
    tl.store(out_ptr + r * stride_or + offs_k, ids, mask=mask_k & ~fill)
    tl.store(out_ptr + r * stride_or + pos, drawn, mask=valid)
    tl.store(left_ptr + r, left)


def fill_distinct_triton(
    ids: torch.Tensor,
    fill: torch.Tensor,
    rows: torch.Tensor,
    num_columns: int,
    key: tuple[int, ...],
    avoid: torch.Tensor | None,
    max_rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection loop of :func:`xmc.sparse.ids.fill_distinct` in one launch.

    Args:
        ids: (R, K) integer ids; the slots not in ``fill`` are kept (distinct within their row).
        fill: (R, K) bool, the slots to draw.
        rows: (R,) int64 global row numbers (hash keys).
        num_columns: D.
        key: leading integers of the hash key.
        avoid: (R, A) ids a drawn id must also differ from, or None.
        max_rounds: attempts before a row gives up.

    Returns:
        ``(ids, left)``: (R, K) int64 ids, and (R,) int32 slots each row still had pending when
        ``max_rounds`` ran out (all 0 normally; the caller raises otherwise).
    """
    require_triton("use the PyTorch path of xmc.sparse.ids.fill_distinct")
    num_rows, fan_in = ids.shape
    width = avoid.shape[1] if avoid is not None else 0
    block_k = triton.next_power_of_2(max(fan_in, 1))
    block_a = triton.next_power_of_2(max(width, 1))
    if block_k > MAX_BLOCK or block_a > MAX_BLOCK:
        raise ValueError(f"rows of K = {fan_in}, A = {width} are wider than the kernel's {MAX_BLOCK}")
    ids, rows = ids.contiguous(), rows.contiguous()
    avoid = avoid.contiguous() if avoid is not None else None
    out = torch.empty((num_rows, fan_in), dtype=torch.int64, device=ids.device)
    left = torch.empty((num_rows,), dtype=torch.int32, device=ids.device)
    if num_rows == 0 or fan_in == 0:
        return out.copy_(ids), left.zero_()
    # The drawn slots of each row, first in slot order: (R, F) positions and (R,) counts.
    count = fill.sum(dim=1, dtype=torch.int32)
    most = int(count.max())
    pos = torch.argsort((~fill).view(torch.uint8), dim=1, stable=True)[:, :most].to(torch.int32).contiguous()
    has_kept = most < fan_in or bool((count < fan_in).any())
    prefix = int(hash_keys(*key))
    fill = fill.contiguous().view(torch.uint8)
    _fill_distinct_kernel[(num_rows,)](
        ids,
        fill,
        pos,
        count,
        avoid if avoid is not None else ids,  # never read without HAS_AVOID
        rows,
        out,
        left,
        fan_in,
        width,
        num_columns,
        prefix,
        max_rounds,
        ids.stride(0),
        fill.stride(0),
        pos.stride(0),
        avoid.stride(0) if avoid is not None else 0,
        out.stride(0),
        HAS_KEPT=has_kept,
        HAS_AVOID=avoid is not None,
        BLOCK_K=block_k,
        BLOCK_F=triton.next_power_of_2(max(most, 1)),
        BLOCK_A=block_a,
        num_warps=4,
    )
    return out, left
