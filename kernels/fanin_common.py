"""The pieces the three fixed fan-in ops share: layer checks, the CSC view of a pattern and the input-gradient
gather over it.

:mod:`xmc.kernels.fixed_fanin` (one id row per label), :mod:`xmc.kernels.grouped_fanin` (one per group of G
labels) and :mod:`xmc.kernels.fixed_fanin_loss` (the fused loss) store their ids alike and compute their input
gradient with one kernel. Held here:

- ``check_layer`` / ``check_grad_out``: shapes, dtypes and devices both backends of an op accept.
- ``column_transpose``: the CSC view of the ids (``col_ptr (D + 1,)``, ``slots``: flat slot ids sorted by
  column, stable), built once per sparsity pattern.
- The input-gradient kernel and its launchers: a program owns a block of columns and gathers, per column, the
  slots of a range of labels (found with the Triton helper ``lower_bound``), each column's part cut into up to
  ``BWD_X_SPLITS`` splits whose partial sums are added in a fixed order: deterministic, no atomics. Why a
  gather rather than a scatter, the buffer layouts and the memory traffic are in the docstring of
  :mod:`xmc.kernels.fixed_fanin`. ``gather_input_gradient`` is one launch over a label range whose
  transposed gradients are given; ``input_gradient_in_ranges`` walks a label block range by range; the
  constants ``BWD_X_*`` size the ranges and the splits.
"""

from __future__ import annotations

import torch
from xmc.kernels._common import TRITON_DTYPES, block, new_output, tl, triton
from xmc.kernels._common import jit as _jit

__all__ = [
    "BWD_X_CHUNK_BYTES",
    "BWD_X_SPLITS",
    "BWD_X_SPLIT_SLOTS",
    "INDEX_DTYPES",
    "TRANSPOSE_CHUNK",
    "check_grad_out",
    "check_layer",
    "column_transpose",
    "gather_input_gradient",
    "input_gradient_in_ranges",
    "input_gradient_splits",
    "lower_bound",
    "search_steps",
]

INDEX_DTYPES = (torch.int16, torch.int32)

# Input-gradient gather tiles: BLOCK_D columns x BLOCK_S slots x up to 128 batch rows, each column's slots in
# up to BWD_X_SPLITS parts. Measured on an H100 in benchmarks/bench_fixed_fanin.py.
_BWD_X_MAX_BLOCK_B, _BWD_X_BLOCK_D, _BWD_X_BLOCK_S, BWD_X_SPLITS = 128, 4, 16, 8
BWD_X_CHUNK_BYTES = 2**25  # the transposed gradients of one label range (32 MiB: L2-resident on an H100)
BWD_X_SPLIT_SLOTS = 256  # a column's slots are split only into parts of at least this many

# The column transpose sorts this many slots at a time (bounds its int64 temporaries to ~0.3 GiB).
TRANSPOSE_CHUNK = 2**23


# ----------------------------------------------------------------------------------------------------------
# Triton: the input-gradient gather
# ----------------------------------------------------------------------------------------------------------


@_jit
def lower_bound(slots_ptr, lo, hi, target, steps):
    """Per lane, the first position p in [lo, hi) with slots[p] >= target (hi if none): a column's segment
    is sorted by slot id (stable transpose), so this finds where a row range starts inside it. ``steps``
    bounds log2 of a segment's length (a loop, not unrolled: one compilation for every size)."""
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(slots_ptr + mid, mask=active, other=0).to(tl.int64)
        less = active & (v < target)
        lo = tl.where(less, mid + 1, lo)
        hi = tl.where(active & ~less, mid, hi)
    return lo


@_jit(do_not_specialize=["row0", "row1", "steps"])
def _fixed_fanin_bwd_x_kernel(
    gt_ptr,
    w_ptr,
    col_ptr_ptr,
    slots_ptr,
    part_ptr,
    B,
    D,
    K,
    row0,
    row1,
    steps,
    stride_gr,
    stride_gb,
    stride_wl,
    stride_wk,
    stride_ps,
    stride_pb,
    stride_pd,
    SPLITS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program: the partial input gradient part[split, b, d] of labels row0..row1-1 for BLOCK_D columns
    x BLOCK_B batch rows, over its split (one of SPLITS) of each column's slots in that label range.

    ``gt`` is grad_out[:, row0:row1] transposed (rows, B): a slot's B gradients are one contiguous row,
    read from L2 (the host sizes the label range so ``gt`` stays small)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_d = offs_d < D
    mask_b = offs_b < B

    start = tl.load(col_ptr_ptr + offs_d, mask=mask_d, other=0)  # (BLOCK_D,) int64
    end = tl.load(col_ptr_ptr + offs_d + 1, mask=mask_d, other=0)
    row0 = row0.to(tl.int64)  # row0 * K may pass 2**31
    first = lower_bound(slots_ptr, start, end, row0 * K, steps)  # this label range's part of column d
    last = lower_bound(slots_ptr, first, end, row1.to(tl.int64) * K, steps)
    share = (last - first + SPLITS - 1) // SPLITS
    lo = first + pid_s * share
    hi = tl.minimum(lo + share, last)
    longest = tl.max(hi - lo, axis=0)

    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    for s0 in range(0, longest, BLOCK_S):
        pos = lo[:, None] + s0 + tl.arange(0, BLOCK_S)[None, :]  # (BLOCK_D, BLOCK_S) positions in slots
        mask_s = pos < hi[:, None]
        slot = tl.load(slots_ptr + pos, mask=mask_s, other=0).to(tl.int64)
        row = slot // K
        w = tl.load(w_ptr + row * stride_wl + (slot - row * K) * stride_wk, mask=mask_s, other=0.0)
        g = tl.load(
            gt_ptr + (row - row0)[:, :, None] * stride_gr + offs_b[None, None, :] * stride_gb,
            mask=mask_s[:, :, None] & mask_b[None, None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_S, BLOCK_B)
        acc += tl.sum(g.to(tl.float32) * w.to(tl.float32)[:, :, None], axis=1)

    out = part_ptr + pid_s * stride_ps + offs_b[None, :] * stride_pb + offs_d[:, None] * stride_pd
    tl.store(out, acc, mask=mask_d[:, None] & mask_b[None, :])


# ----------------------------------------------------------------------------------------------------------
# Validation and the CSC transpose
# ----------------------------------------------------------------------------------------------------------


def check_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    triton_path: bool,
    group: int = 1,
) -> None:
    """Shapes, dtypes and devices shared by both backends; ``triton_path`` adds the Triton dtype limits.
    ``group`` G > 1: the grouped layer, one id row per G labels (:mod:`xmc.kernels.grouped_fanin`)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if group < 1:
        raise ValueError(f"group must be a positive number of labels, got {group}")
    if group == 1 and (weight.dim() != 2 or indices.shape != weight.shape):
        raise ValueError(
            f"weight and indices must both be (L, K), got {tuple(weight.shape)} and {tuple(indices.shape)}"
        )
    if group > 1 and (weight.dim() != 2 or indices.shape != (-(-weight.shape[0] // group), weight.shape[1])):
        raise ValueError(
            f"weight must be (L, K) and indices (ceil(L / G), K) with G = {group}, got {tuple(weight.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be (L,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    float_dtypes = TRITON_DTYPES if triton_path else (*TRITON_DTYPES, torch.float64)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in float_dtypes:
            hint = " (float64 runs on the reference backend)" if t.dtype == torch.float64 else ""
            raise ValueError(f"{name} dtype {t.dtype} is not one of {float_dtypes}{hint}")
    index_dtypes = INDEX_DTYPES if triton_path else (*INDEX_DTYPES, torch.int64)
    if indices.dtype not in index_dtypes:
        raise ValueError(f"indices dtype {indices.dtype} is not one of {index_dtypes}")
    for name, t in (("weight", weight), ("indices", indices), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")


def check_grad_out(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, float_dtypes) -> None:
    expected = (x.shape[0], weight.shape[0])
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must be (B, L) = {expected}, got {tuple(grad_out.shape)}")
    if grad_out.dtype not in float_dtypes:
        raise ValueError(f"grad_out dtype {grad_out.dtype} is not one of {float_dtypes}")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out is on {grad_out.device} but x is on {x.device}")


def column_transpose(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSC view of the sparsity pattern, for the input-gradient kernel.

    Args:
        indices: (L, K) int16 / int32 / int64 column ids in ``[0, in_features)``.
        in_features: D.

    Returns:
        ``col_ptr`` (D + 1,) int64: the slots of column d are ``slots[col_ptr[d]:col_ptr[d + 1]]``;
        ``slots`` (L * K,) flat slot ids ``l * K + j`` sorted by column, stable (row order within a column);
        int32 when L * K < 2**31, else int64. Cache both; recompute only when ``indices`` changes.
    """
    if indices.dim() != 2 or indices.dtype not in (*INDEX_DTYPES, torch.int64):
        raise ValueError(
            f"indices must be a 2-D integer tensor (L, K), got {indices.dtype} {tuple(indices.shape)}"
        )
    flat = indices.reshape(-1)
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= in_features:
            raise ValueError(f"indices must lie in [0, {in_features}), found [{int(lo)}, {int(hi)}]")
    device, total = indices.device, flat.numel()
    counts = torch.bincount(flat, minlength=in_features)
    col_ptr = torch.zeros(in_features + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=col_ptr[1:])
    slots = torch.empty(total, dtype=torch.int32 if total < 2**31 else torch.int64, device=device)
    # A stable counting sort, a chunk of slots at a time: a slot's place is its column's start, plus the
    # slots of that column in earlier chunks, plus its rank among the chunk's slots of that column. The
    # result equals a global stable argsort, but the int64 temporaries stay at the chunk's size rather
    # than 8 bytes per slot of the whole layer (1.4 GiB at L = 2.8M, K = 64).
    placed = col_ptr[:-1].clone()  # next free position of each column
    for lo in range(0, total, TRANSPOSE_CHUNK):
        part = flat[lo : lo + TRANSPOSE_CHUNK]
        order = torch.argsort(part, stable=True)
        cols = part[order].long()
        part_counts = torch.bincount(cols, minlength=in_features)
        first = torch.cumsum(part_counts, dim=0) - part_counts  # each column's first place in `cols`
        rank = torch.arange(cols.numel(), device=device) - first[cols]
        slots[placed[cols] + rank] = (order + lo).to(slots.dtype)
        placed += part_counts
    return col_ptr, slots


# ----------------------------------------------------------------------------------------------------------
# Launchers of the gather
# ----------------------------------------------------------------------------------------------------------


def search_steps(length: int) -> int:
    """Rounds of :func:`lower_bound` enough for a sorted segment of up to ``length`` entries."""
    return max(1, length.bit_length() + 1)


def input_gradient_splits(range_slots: int, D: int) -> int:
    """Parts each column's slots are split into when a label range holds ``range_slots`` slots over D
    columns: enough programs for a GPU, each part at least BWD_X_SPLIT_SLOTS slots (small layers, and the
    interpreter, get one)."""
    return max(1, min(BWD_X_SPLITS, range_slots // (D * BWD_X_SPLIT_SLOTS)))


def input_gradient_in_ranges(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    col_ptr: torch.Tensor,
    slots: torch.Tensor,
    D: int,
    row_start: int = 0,
) -> torch.Tensor:
    """grad_x (B, D) in fp32 from the gradients ``grad_out`` (B, n) of labels ``row_start .. row_start + n
    - 1`` (the whole layer's ``weight`` and transpose), a range of labels at a time: each range's
    gradients are transposed into a small (rows, B) buffer that stays in L2, and its SPLITS partial sums
    per column are added in a fixed order (deterministic, no atomics)."""
    B, n = grad_out.shape
    L, K = weight.shape
    rows = max(1, BWD_X_CHUNK_BYTES // (B * grad_out.element_size()))
    steps = search_steps(L * K)  # enough for any column's segment
    splits = input_gradient_splits(min(rows, n) * K, D)
    parts = new_output((splits, B, D), torch.float32, grad_out.device)
    total = torch.zeros((B, D), dtype=torch.float32, device=grad_out.device)
    for row0 in range(row_start, row_start + n, rows):
        row1 = min(row_start + n, row0 + rows)
        gt = grad_out[:, row0 - row_start : row1 - row_start].t().contiguous()  # (rows, B)
        total += gather_input_gradient(gt, weight, col_ptr, slots, parts, K, row0, row1, steps)
    return total


def gather_input_gradient(
    gt: torch.Tensor,
    weight: torch.Tensor,
    col_ptr: torch.Tensor,
    slots: torch.Tensor,
    parts: torch.Tensor,
    K: int,
    row0: int,
    row1: int,
    steps: int,
    weight_strides: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One launch of the input-gradient kernel over rows ``row0 .. row1 - 1``, whose transposed gradients
    are ``gt`` (rows, B); fills ``parts`` (splits, B, D) and returns their sum (B, D) in fp32.
    ``weight_strides`` overrides the weight's (a one-element tensor with strides (0, 0) weighs every
    slot 1, as the grouped layer's second pass needs)."""
    splits, B, D = parts.shape
    block_b = block(B, _BWD_X_MAX_BLOCK_B)
    stride_wl, stride_wk = weight.stride() if weight_strides is None else weight_strides
    _fixed_fanin_bwd_x_kernel[(triton.cdiv(D, _BWD_X_BLOCK_D), splits, triton.cdiv(B, block_b))](
        gt,
        weight,
        col_ptr,
        slots,
        parts,
        B,
        D,
        K,
        row0,
        row1,
        steps,
        gt.stride(0),
        gt.stride(1),
        stride_wl,
        stride_wk,
        parts.stride(0),
        parts.stride(1),
        parts.stride(2),
        SPLITS=splits,
        BLOCK_B=block_b,
        BLOCK_D=_BWD_X_BLOCK_D,
        BLOCK_S=_BWD_X_BLOCK_S,
        num_warps=4,
    )
    return parts.sum(dim=0)
