"""Drawing distinct column ids per row, as pure functions of (seed, purpose, step, global row, slot).

Used for a fixed fan-in layer's initial ids and for regrowth after pruning. Because every number is
a hash of its key (see :mod:`xmc.kernels.hashing`), a row gets the same ids whether it is drawn alone, in a
label shard or in the whole layer, and no Python loop over rows is needed.
"""

from __future__ import annotations

import torch

from xmc.kernels._common import triton
from xmc.kernels.fill_distinct import MAX_BLOCK, fill_distinct_triton
from xmc.kernels.hashing import hash_keys

# Purposes keep the streams of different draws apart.
INIT_IDS, INIT_WEIGHT, INIT_BIAS, REGROW_IDS = 1, 2, 3, 4

_MAX_ROUNDS = 64


def fill_distinct(
    ids: torch.Tensor,
    fill: torch.Tensor,
    rows: torch.Tensor,
    num_columns: int,
    key: tuple[int, ...],
    avoid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace ``ids[fill]`` by random columns so every row's ids are distinct.

    Args:
        ids: (R, K) integer column ids; entries where ``fill`` is False are kept and must already be
            distinct within their row.
        fill: (R, K) bool, the slots to draw.
        rows: (R,) int64 global row numbers (part of the key).
        num_columns: D; ids are drawn from ``0..D-1``.
        key: leading integers of the hash key (seed, purpose, step, ...).
        avoid: optional (R, M) ids the drawn ones must also differ from (e.g. the ids just pruned, so
            regrowth explores); ignored for rows where too few columns would remain.

    Returns:
        (R, K) int64 ids. The value drawn for slot (r, j) depends only on ``key``, ``rows[r]``, ``j``
        and the kept ids of row r.
    """
    num_rows, fan_in = ids.shape
    if fan_in > num_columns:
        raise ValueError(f"cannot draw {fan_in} distinct ids per row from {num_columns} columns")
    if not bool(fill.any()):
        return ids.to(torch.int64).clone()
    if avoid is not None and fan_in + avoid.shape[1] > num_columns:
        avoid = None  # not enough columns to avoid them all
    width = 0 if avoid is None else avoid.shape[1]
    # Rejection works well while at most half the columns are blocked; denser rows take the lowest-hash
    # free columns instead (exact, O(R x D)). On CUDA the rejection loop is one Triton kernel. Near half
    # (e.g. K = D / 2 with every slot drawn) a row can still be pending after _MAX_ROUNDS attempts: such
    # rows are drawn by ranking too. Which rows those are depends only on their keys and kept ids, so the
    # result stays a pure function of them, the same on every device and in every label shard.
    rejection = 2 * (fan_in + width) <= num_columns
    if not rejection:
        return _fill_by_ranking_avoiding(ids, fill, rows, num_columns, key, avoid)
    if _use_kernel(ids, fan_in, width):
        drawn, left = fill_distinct_triton(ids, fill, rows, num_columns, key, avoid, _MAX_ROUNDS)
        pending_rows = left > 0
    else:
        drawn, pending = _fill_by_rejection(ids, fill, rows, num_columns, key, avoid)
        pending_rows = pending.any(dim=1)
    if bool(pending_rows.any()):
        late = pending_rows.nonzero().squeeze(1)
        drawn[late] = _fill_by_ranking_avoiding(
            ids[late], fill[late], rows[late], num_columns, key, None if avoid is None else avoid[late]
        )
    return drawn


def _fill_by_rejection(
    ids, fill, rows, num_columns: int, key: tuple, avoid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection loop (arguments as :func:`fill_distinct`'s): (R, K) int64 ids and the (R, K) bool slots
    still pending after _MAX_ROUNDS."""
    fan_in = ids.shape[1]
    blocked = _with_avoided(ids, avoid)
    slots = torch.arange(fan_in, device=ids.device)
    pending = fill.clone()
    # The key up to the attempt, hashed once; each round folds in its attempt for the pending slots only
    # (after the first round a few percent of them), so a round costs far less than a full hash.
    prefix = hash_keys(*key, rows[:, None], slots[None, :])
    for attempt in range(_MAX_ROUNDS):
        where = pending.nonzero(as_tuple=True)
        blocked[:, :fan_in][where] = hash_keys(attempt, state=prefix[where]) % num_columns
        pending = _repeated(blocked)[:, :fan_in] & fill
        if not bool(pending.any()):
            break
    return blocked[:, :fan_in].clone(), pending


def _fill_by_ranking_avoiding(ids, fill, rows, num_columns: int, key: tuple, avoid) -> torch.Tensor:
    """Ranking over the row's free columns, with ``avoid`` blocked too (callers keep K + A <= D); arguments
    as :func:`fill_distinct`'s."""
    fan_in = ids.shape[1]
    blocked = _with_avoided(ids, avoid)
    blocked_fill = torch.zeros_like(blocked, dtype=torch.bool)
    blocked_fill[:, :fan_in] = fill
    return _fill_by_ranking(blocked, blocked_fill, rows, num_columns, key)[:, :fan_in]


def _with_avoided(ids: torch.Tensor, avoid: torch.Tensor | None) -> torch.Tensor:
    """A new (R, K + A) int64 tensor: each row's ids, then the ids it must avoid."""
    ids = ids.to(torch.int64)
    return ids.clone() if avoid is None else torch.cat([ids, avoid.to(torch.int64)], dim=1)


def _use_kernel(ids: torch.Tensor, fan_in: int, width: int) -> bool:
    """CUDA rows narrow enough for the Triton kernel (same ids, one launch instead of ~20 passes a round)."""
    return ids.is_cuda and triton is not None and max(fan_in, width) <= MAX_BLOCK


def _repeated(ids: torch.Tensor) -> torch.Tensor:
    """(R, K) bool marking every slot whose id occurs more than once in its row.

    Callers mask the result with the drawn slots: a drawn id that collides with a kept one redraws
    while the kept one stays, and drawn ids that collide with each other all redraw.
    """
    order = torch.sort(ids, dim=1)
    sorted_ids, perm = order.values, order.indices
    same_as_next = torch.zeros_like(ids, dtype=torch.bool)
    same_as_next[:, :-1] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    in_group = same_as_next.clone()
    in_group[:, 1:] |= same_as_next[:, :-1]  # the slot after an equal pair is in the group too
    marks = torch.zeros_like(in_group)
    marks.scatter_(1, perm, in_group)
    return marks


def _fill_by_ranking(
    out: torch.Tensor, fill: torch.Tensor, rows: torch.Tensor, num_columns: int, key: tuple[int, ...]
) -> torch.Tensor:
    columns = torch.arange(num_columns, device=out.device)
    scores = hash_keys(*key, rows[:, None], columns[None, :]).to(torch.float64)
    kept = torch.where(fill, torch.zeros_like(out), out)
    taken = torch.zeros(out.shape[0], num_columns, dtype=torch.int64, device=out.device)
    taken.scatter_add_(1, kept, (~fill).to(torch.int64))
    scores[taken > 0] = float("inf")
    need = int(fill.sum(1).max())  # at most the free columns, as callers keep blocked <= D
    best = torch.topk(scores, need, dim=1, largest=False).indices  # (R, need) free columns, best first
    rank = torch.cumsum(fill.to(torch.int64), dim=1) - 1  # j-th drawn slot takes the j-th best column
    picked = torch.gather(best, 1, rank.clamp(min=0))
    return torch.where(fill, picked, out)
