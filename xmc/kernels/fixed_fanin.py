"""Fixed fan-in sparse layer: every output label keeps exactly K connections into the D inputs.

The layer stores values ``weight (L, K)`` and column ids ``indices (L, K)`` (int16 or int32, distinct within a
row), plus an optional ``bias (L,)``. For an input ``x (B, D)``:

    forward        out[b, l]    = sum_j w[l, j] * x[b, idx[l, j]]  (+ bias[l])
    input grad     grad_x[b, d] = sum over slots (l, j) with idx[l, j] == d of  w[l, j] * grad_out[b, l]
    weight grad    grad_w[l, j] = sum_b grad_out[b, l] * x[b, idx[l, j]]
    bias grad      grad_b[l]    = sum_b grad_out[b, l]

All three accumulate in fp32 (bf16, fp16 or fp32 operands) and write their result in the dtype of the tensor
it is the gradient of (``out`` in x's dtype; ``grad_b`` in the weight's dtype).

Why the input gradient gathers instead of scattering. Read straight off the sparsity pattern, ``grad_x`` is a
scatter: slot (l, j) adds into column idx[l, j]. D is small (768) while L * K is around 1e8, so atomics into
``grad_x`` would have every program hitting the same few hundred addresses: they serialize, and fp32 atomics
make the result depend on arrival order. Instead we build, once per sparsity pattern, its transpose in CSC
form (``column_transpose``): ``col_ptr (D + 1,)`` int64 and ``slots (L * K,)`` holding the flat slot ids
``l * K + j`` sorted by column (stable, so slots of one column stay in row order). A program then owns a
block of columns and gathers every slot of its columns: no races, no atomics, the same sum in the same
order on every run. The transpose costs a stable counting sort of L * K ids (chunked, so its temporaries
stay small) and 4 bytes per slot (int32 ``slots``; int64 once L * K >= 2**31); the caller keeps it and
recomputes it only when the ids change (after SET rewiring).

Layouts for coalesced gathers. Every kernel gathers B values per slot. The forward and the weight gradient
read them from x transposed (D, B), where they are one contiguous row; the input gradient reads them from
grad_out transposed, a range of labels at a time (a 32 MiB buffer that stays in L2, so the B x L gradient
is never copied whole): inside a column's segment the slots of a label range are contiguous (row order),
found by binary search, and each column's part is cut into up to 8 splits whose partial sums are added in
a fixed order.

Memory traffic (s_x, s_w, s_g, s_o: bytes per element of x, weight, grad_out, out; s_i: bytes per id, 2 or 4;
s_s: bytes per CSC slot id, 4 or 8; Bb = ceil(B / 128) batch blocks):

    forward      weight + ids   Bb * L * K * (s_w + s_i)
                 x gathers      B * L * K * s_x            (rows of x^T, served from L2)
                 out            B * L * s_o                (written)
    input grad   grad_out       2 * B * L * s_g            (read, written transposed per label range)
                 slots          L * K * s_s
                 weight         L * K * s_w                (gathered in column order: scattered reads)
                 grad_out^T     B * L * K * s_g            (rows of a label range's buffer, from L2)
                 partials       R * S * B * D * 4 * 2      (R label ranges, S <= 8 splits; written, summed)
                 grad_x         B * D * s_x                (written)
    weight grad  ids            L * K * s_i
                 x gathers      B * L * K * s_x            (L2)
                 grad_out       B * L * s_g                (once while B <= 128; else once per slot)
                 grad_w, grad_b L * K * s_w  +  L * s_w    (written)

The gathers (B * L * K elements) dominate every kernel; the floor is reading weights and ids once. Closing
that gap (x on chip, shared index sets per label group, fused losses) is future work; see DESIGN.md.

Offsets: any of L * K, B * L may exceed 2**31, so program ids and row offsets are cast to int64 before they
meet a stride. Column ids stay 32-bit (they only index the small x).

Every kernel has a plain-PyTorch twin (``fixed_fanin_forward_reference`` /
``fixed_fanin_backward_reference``), chunked over labels so memory stays bounded at millions of labels; it is
the CPU path and the test oracle."""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from xmc.kernels._common import jit as _jit
from xmc.kernels._common import tl, triton

__all__ = [
    "FixedFanInFunction",
    "column_transpose",
    "fixed_fanin",
    "fixed_fanin_backward",
    "fixed_fanin_backward_reference",
    "fixed_fanin_backward_triton",
    "fixed_fanin_forward",
    "fixed_fanin_forward_reference",
    "fixed_fanin_forward_triton",
    "fixed_fanin_input_gradient_triton",
    "use_triton",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int16, torch.int32)
BACKENDS = ("auto", "triton", "reference")

# Block sizes. Forward and weight gradient: (BLOCK_L labels, up to 128 batch rows) per program, the batch
# contiguous in each gathered row of x^T, UNROLL slots' gathers in flight. Input gradient: gather tiles of
# BLOCK_D columns x BLOCK_S slots x up to 128 batch rows, each column's slots in SPLITS parts. Measured on
# an H100 in benchmarks/bench_fixed_fanin.py.
_FWD_BLOCK_L, _FWD_MAX_BLOCK_B, _UNROLL = 64, 128, 4
_BWD_X_MAX_BLOCK_B, _BWD_X_BLOCK_D, _BWD_X_BLOCK_S, _BWD_X_SPLITS = 128, 4, 16, 8
_BWD_X_CHUNK_BYTES = 2**25  # the transposed gradients of one label range (32 MiB: L2-resident on an H100)
_BWD_X_SPLIT_SLOTS = 256  # a column's slots are split only into parts of at least this many
_BWD_W_BLOCK_L, _BWD_W_MAX_BLOCK_B = 64, 128

# The column transpose sorts this many slots at a time (bounds its int64 temporaries to ~0.3 GiB).
TRANSPOSE_CHUNK = 2**23
# The reference keeps each gathered ``x[:, idx[chunk]]`` tensor under this many elements.
REFERENCE_CHUNK_ELEMENTS = 2**24
# The reference weight gradient computes the dense (chunk, D) product g^T x and samples it at the ids while
# D < SAMPLED_WIDTH_RATIO * K; wider inputs (e.g. raw TF-IDF features, D = 20,000 with K = 64) score only
# the L * K slots with a sampled sparse product: 0.11 s against ~68 GFLOP dense at that shape on 2 cores.
SAMPLED_WIDTH_RATIO = 16


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@_jit
def _fixed_fanin_fwd_kernel(
    xt_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    out_ptr,
    B,
    L,
    K,
    stride_xd,
    stride_xb,
    stride_wl,
    stride_wk,
    stride_il,
    stride_ik,
    stride_ob,
    stride_ol,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One program: out[b, l] for BLOCK_L labels x BLOCK_B batch rows, one slot at a time. ``xt`` is x
    transposed (D, B), so a slot's B inputs are one contiguous, coalesced row read (from L2: x is small)."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,) int64
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,) int32: B * D < 2**31
    mask_l = offs_l < L
    mask_b = offs_b < B
    w_rows = w_ptr + offs_l * stride_wl
    i_rows = idx_ptr + offs_l * stride_il
    slot0 = tl.zeros((BLOCK_L,), dtype=tl.int32)  # the slot number as a vector, for the masks

    acc = tl.zeros((BLOCK_L, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):  # independent gathers in flight
            mask = mask_l & (slot0 + (k0 + u) < K)
            w = tl.load(w_rows + (k0 + u) * stride_wk, mask=mask, other=0.0).to(tl.float32)
            cols = tl.load(i_rows + (k0 + u) * stride_ik, mask=mask, other=0).to(tl.int32)
            xv = tl.load(
                xt_ptr + cols[:, None] * stride_xd + offs_b[None, :] * stride_xb,
                mask=mask[:, None] & mask_b[None, :],
                other=0.0,
            )  # (BLOCK_L, BLOCK_B)
            acc += w[:, None] * xv.to(tl.float32)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    out_offs = offs_b.to(tl.int64)[None, :] * stride_ob + offs_l[:, None] * stride_ol
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_l[:, None] & mask_b[None, :])


@_jit
def _lower_bound(slots_ptr, lo, hi, target, steps):
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
    first = _lower_bound(slots_ptr, start, end, row0 * K, steps)  # this label range's part of column d
    last = _lower_bound(slots_ptr, first, end, row1.to(tl.int64) * K, steps)
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


@_jit
def _fixed_fanin_bwd_w_kernel(
    grad_out_ptr,
    xt_ptr,
    idx_ptr,
    grad_w_ptr,
    grad_b_ptr,
    B,
    L,
    K,
    stride_gb,
    stride_gl,
    stride_xd,
    stride_xb,
    stride_il,
    stride_ik,
    stride_wl,
    stride_wk,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One program: grad_w for BLOCK_L labels x all K slots, and grad_b for those labels. When the batch fits
    one block (``ONE_BLOCK``), the gradient tile g[:, labels] stays in registers while the slots stream by;
    otherwise each slot walks the batch in blocks. Programs own disjoint outputs: no races."""
    pid_l = tl.program_id(0).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_b = tl.arange(0, BLOCK_B)
    i_rows = idx_ptr + offs_l * stride_il
    w_rows = grad_w_ptr + offs_l * stride_wl
    slot0 = tl.zeros((BLOCK_L,), dtype=tl.int32)  # the slot number as a vector, for the masks

    if ONE_BLOCK:
        mask_b = offs_b < B
        g = tl.load(
            grad_out_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
            mask=mask_l[:, None] & mask_b[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_L, BLOCK_B)
        if NEED_B:
            tl.store(grad_b_ptr + offs_l, tl.sum(g, axis=1).to(grad_b_ptr.dtype.element_ty), mask=mask_l)
        if NEED_W:
            for k0 in range(0, K, UNROLL):
                for u in tl.static_range(UNROLL):
                    mask = mask_l & (slot0 + (k0 + u) < K)
                    cols = tl.load(i_rows + (k0 + u) * stride_ik, mask=mask, other=0).to(tl.int32)
                    xv = tl.load(
                        xt_ptr + cols[:, None] * stride_xd + offs_b[None, :] * stride_xb,
                        mask=mask[:, None] & mask_b[None, :],
                        other=0.0,
                    )
                    gw = tl.sum(g * xv.to(tl.float32), axis=1)
                    tl.store(w_rows + (k0 + u) * stride_wk, gw.to(grad_w_ptr.dtype.element_ty), mask=mask)
    else:
        if NEED_B:
            acc_b = tl.zeros((BLOCK_L,), dtype=tl.float32)
            for b0 in range(0, B, BLOCK_B):
                ob = b0 + offs_b
                g = tl.load(
                    grad_out_ptr + ob.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
                    mask=mask_l[:, None] & (ob < B)[None, :],
                    other=0.0,
                )
                acc_b += tl.sum(g.to(tl.float32), axis=1)
            tl.store(grad_b_ptr + offs_l, acc_b.to(grad_b_ptr.dtype.element_ty), mask=mask_l)
        if NEED_W:
            for k in range(0, K):
                cols = tl.load(i_rows + k * stride_ik, mask=mask_l, other=0).to(tl.int32)
                acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
                for b0 in range(0, B, BLOCK_B):
                    ob = b0 + offs_b
                    mask = mask_l[:, None] & (ob < B)[None, :]
                    g = tl.load(
                        grad_out_ptr + ob.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
                        mask=mask,
                        other=0.0,
                    )
                    xv = tl.load(
                        xt_ptr + cols[:, None] * stride_xd + ob[None, :] * stride_xb, mask=mask, other=0.0
                    )
                    acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=1)
                tl.store(w_rows + k * stride_wk, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_l)


# ----------------------------------------------------------------------------------------------------------
# Validation and the CSC transpose
# ----------------------------------------------------------------------------------------------------------


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output (uninitialised: the kernels write every element; tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_layer(
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


def _check_grad_out(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, float_dtypes) -> None:
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
# Triton launchers
# ----------------------------------------------------------------------------------------------------------


def _block(size: int, cap: int) -> int:
    """Power-of-two block no larger than needed for ``size``, at most ``cap``."""
    return min(cap, triton.next_power_of_2(max(size, 1)))


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use backend='reference' (the CPU path)")


def fixed_fanin_forward_triton(
    x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton forward: x (B, D), weight (L, K), indices (L, K) int16/int32, bias (L,) or None -> out (B, L) in
    x's dtype. Floats are bf16 / fp16 / fp32 (fp32 accumulation); all tensors on one device."""
    _require_triton()
    _check_layer(x, weight, indices, bias, triton_path=True)
    x, weight, indices = x.contiguous(), weight.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, L, K = x.shape[0], weight.shape[0], weight.shape[1]
    out = _new_output((B, L), x.dtype, x.device)
    if out.numel() == 0:
        return out
    xt = x.t().contiguous()  # (D, B): a slot's B inputs are contiguous
    block_b = _block(B, _FWD_MAX_BLOCK_B)
    grid = (triton.cdiv(L, _FWD_BLOCK_L), triton.cdiv(B, block_b))
    _fixed_fanin_fwd_kernel[grid](
        xt,
        weight,
        indices,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        B,
        L,
        K,
        xt.stride(0),
        xt.stride(1),
        weight.stride(0),
        weight.stride(1),
        indices.stride(0),
        indices.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_B=block_b,
        BLOCK_L=_FWD_BLOCK_L,
        UNROLL=_UNROLL,
        num_warps=8 if block_b >= 64 else 4,
    )
    return out


def _input_gradient(
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
    rows = max(1, _BWD_X_CHUNK_BYTES // (B * grad_out.element_size()))
    steps = max(1, (L * K).bit_length() + 1)  # binary-search rounds: enough for any column's segment
    # Splits give a GPU enough programs; small layers (and the interpreter) need one.
    splits = max(1, min(_BWD_X_SPLITS, min(rows, n) * K // (D * _BWD_X_SPLIT_SLOTS)))
    parts = _new_output((splits, B, D), torch.float32, grad_out.device)
    total = torch.zeros((B, D), dtype=torch.float32, device=grad_out.device)
    for row0 in range(row_start, row_start + n, rows):
        row1 = min(row_start + n, row0 + rows)
        gt = grad_out[:, row0 - row_start : row1 - row_start].t().contiguous()  # (rows, B)
        total += _gather_input_gradient(gt, weight, col_ptr, slots, parts, K, row0, row1, steps)
    return total


def _gather_input_gradient(
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
    block_b = _block(B, _BWD_X_MAX_BLOCK_B)
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


def fixed_fanin_input_gradient_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    col_ptr: torch.Tensor,
    slots: torch.Tensor,
    row_start: int = 0,
) -> torch.Tensor:
    """Triton input gradient of a block of labels: grad_x (B, D) in x's dtype from ``grad_out`` (B, n), the
    gradients of labels ``row_start .. row_start + n - 1`` of the layer whose whole ``weight`` (L, K) and
    ``column_transpose`` (``col_ptr``, ``slots``) are given. A label-chunked loss calls it per chunk with the
    layer's cached transpose instead of sorting each chunk's ids."""
    _require_triton()
    B, D = x.shape
    L = weight.shape[0]
    n = grad_out.shape[1] if grad_out.dim() == 2 else -1
    if grad_out.dim() != 2 or grad_out.shape[0] != B or not 0 <= row_start <= L - n:
        raise ValueError(
            f"grad_out must be (B, n) = ({B}, n) for labels row_start .. row_start + n - 1 within L = {L}, "
            f"got {tuple(grad_out.shape)} at row_start {row_start}"
        )
    if grad_out.dtype not in TRITON_DTYPES or x.dtype not in TRITON_DTYPES:
        raise ValueError(f"grad_out and x must be one of {TRITON_DTYPES}, got {grad_out.dtype} and {x.dtype}")
    K = weight.shape[1]
    if col_ptr.shape != (D + 1,) or col_ptr.dtype != torch.int64:
        raise ValueError(
            f"col_ptr must be int64 of shape ({D + 1},), got {col_ptr.dtype} {tuple(col_ptr.shape)}: "
            "pass column_transpose(indices, D) of the whole layer"
        )
    if slots.dim() != 1 or slots.numel() > L * K or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slots must be 1-D int32/int64 with at most L * K = {L * K} entries, "
            f"got {slots.dtype} {tuple(slots.shape)}"
        )
    if col_ptr.device != x.device or slots.device != x.device:
        raise ValueError(f"col_ptr and slots must be on {x.device}")
    grad_x = _new_output((B, D), x.dtype, x.device)
    if grad_x.numel():
        grad_x.copy_(
            _input_gradient(
                grad_out.contiguous(),
                weight.contiguous(),
                col_ptr.contiguous(),
                slots.contiguous(),
                D,
                row_start,
            )
        )
    return grad_x


def fixed_fanin_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    col_ptr: torch.Tensor | None,
    slots: torch.Tensor | None,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: grad_out (B, L) -> (grad_x (B, D) in x's dtype, grad_w (L, K) and grad_b (L,) in the
    weight's dtype), None for what is not needed. ``col_ptr`` / ``slots`` come from
    ``column_transpose(indices, D)`` and are required only when ``need_x``; the kernel reads
    ``slots[col_ptr[d]:col_ptr[d + 1]]`` for column d, so a transpose of a subset of the slots gives that
    subset's input gradient."""
    _require_triton()
    _check_layer(x, weight, indices, None, triton_path=True)
    _check_grad_out(grad_out, x, weight, TRITON_DTYPES)
    B, D = x.shape
    L, K = weight.shape
    grad_out, x, weight, indices = (
        grad_out.contiguous(),
        x.contiguous(),
        weight.contiguous(),
        indices.contiguous(),
    )
    grad_x = grad_w = grad_b = None

    if need_x:
        if col_ptr is None or slots is None:
            raise ValueError("the input gradient needs col_ptr and slots: pass column_transpose(indices, D)")
        grad_x = fixed_fanin_input_gradient_triton(grad_out, x, weight, col_ptr, slots)

    if need_w:
        grad_w = _new_output((L, K), weight.dtype, weight.device)
    if need_b:
        grad_b = _new_output((L,), weight.dtype, weight.device)
    if (need_w and grad_w.numel()) or (need_b and grad_b.numel()):
        xt = x.t().contiguous()  # (D, B)
        block_b = _block(B, _BWD_W_MAX_BLOCK_B)
        _fixed_fanin_bwd_w_kernel[(triton.cdiv(L, _BWD_W_BLOCK_L),)](
            grad_out,
            xt,
            indices,
            grad_w if need_w else weight,  # placeholders are never written
            grad_b if need_b else weight,
            B,
            L,
            K,
            grad_out.stride(0),
            grad_out.stride(1),
            xt.stride(0),
            xt.stride(1),
            indices.stride(0),
            indices.stride(1),
            weight.stride(0),  # grad_w is a fresh contiguous (L, K) tensor: same strides as weight
            weight.stride(1),
            NEED_W=need_w,
            NEED_B=need_b,
            ONE_BLOCK=B <= block_b,
            BLOCK_B=block_b,
            BLOCK_L=_BWD_W_BLOCK_L,
            UNROLL=_UNROLL,
            num_warps=8 if block_b >= 64 else 4,
        )
    return grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------------------


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _slot_chunk(fan_in: int, width: int) -> int:
    """Labels per chunk: at most REFERENCE_CHUNK_ELEMENTS slots, and as many dense (chunk, D) values."""
    return max(1, REFERENCE_CHUNK_ELEMENTS // max(1, fan_in, width))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _rows_csr(weight: torch.Tensor, indices: torch.Tensor, width: int, acc: torch.dtype) -> torch.Tensor:
    """The (L, D) sparse weight of a block of labels as CSR: every row holds exactly K entries."""
    L, K = weight.shape
    crow = torch.arange(0, L * K + 1, K, device=weight.device)
    return _csr(crow, indices.reshape(-1).long(), weight.reshape(-1).to(acc), (L, width))


def _columns_csr(
    weight: torch.Tensor, indices: torch.Tensor, width: int, acc: torch.dtype, transpose=None
) -> torch.Tensor:
    """The transposed (D, L) sparse weight as CSR, from the CSC view of the pattern."""
    col_ptr, slots = transpose if transpose is not None else column_transpose(indices, width)
    slots = slots.long()
    K = weight.shape[1]
    return _csr(col_ptr, slots // K, weight.reshape(-1)[slots].to(acc), (width, weight.shape[0]))


def fixed_fanin_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference forward, same contract as the Triton one plus float64 and int64 ids, on any device.

    A block of labels at a time becomes a CSR matrix and one sparse-dense product gives its logits:
    the vendor sparse kernels (MKL on CPU) move each weight once, where gathering ``x[:, idx]`` would
    materialize B * L * K values."""
    _check_layer(x, weight, indices, bias, triton_path=False)
    with torch.autocast(x.device.type, enabled=False):  # the products must run in the accumulation dtype
        return _forward_reference(x, weight, indices, bias)


def _forward_reference(x, weight, indices, bias):
    B, L, K = x.shape[0], weight.shape[0], weight.shape[1]
    acc = _accumulation_dtype(x.dtype, weight.dtype)
    xt = x.to(acc).t()  # (D, B)
    out = torch.empty((B, L), dtype=x.dtype, device=x.device)
    step = _slot_chunk(K, 1)
    for lo in range(0, L, step):
        hi = min(L, lo + step)
        part = (_rows_csr(weight[lo:hi], indices[lo:hi], x.shape[1], acc) @ xt).t()  # (B, chunk)
        if bias is not None:
            part = part + bias[lo:hi].to(acc)
        out[:, lo:hi] = part
    return out


def fixed_fanin_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    transpose: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference backward, same contract as ``fixed_fanin_backward_triton``.

    The input gradient is a sparse-dense product with the transposed weight (built from the CSC view;
    pass the cached ``transpose`` of the whole layer to skip its sort). The weight gradient of a label
    block is the dense ``grad_out[:, block]^T @ x`` sampled at the block's ids: on CPUs a dense product
    beats gathering B values per slot until K is a small fraction of D, and label blocks keep the
    dense (block, D) product bounded; from ``D >= SAMPLED_WIDTH_RATIO * K`` a sampled sparse product
    (``torch.sparse.sampled_addmm``) scores only the slots."""
    _check_layer(x, weight, indices, None, triton_path=False)
    _check_grad_out(grad_out, x, weight, (*TRITON_DTYPES, torch.float64))
    with torch.autocast(x.device.type, enabled=False):
        return _backward_reference(grad_out, x, weight, indices, need_x, need_w, need_b, transpose)


def _backward_reference(grad_out, x, weight, indices, need_x, need_w, need_b, transpose):
    B, D = x.shape
    L, K = weight.shape
    acc = _accumulation_dtype(x.dtype, weight.dtype, grad_out.dtype)
    g = grad_out.to(acc)
    xa = x.to(acc)
    grad_x = torch.zeros((D, B), dtype=acc, device=x.device) if need_x else None
    grad_w = torch.empty((L, K), dtype=weight.dtype, device=weight.device) if need_w else None
    sampled = D >= SAMPLED_WIDTH_RATIO * K
    # Only the dense weight-gradient product holds (chunk, D) values; the sparse products hold slots.
    step = _slot_chunk(K, 1 if sampled else D)
    whole = transpose if step >= L else None
    for lo in range(0, L, step if (need_x or need_w) else L):
        hi = min(L, lo + step)
        if need_x:
            grad_x += _columns_csr(weight[lo:hi], indices[lo:hi], D, acc, whole) @ g[:, lo:hi].t()
        if need_w:
            ids = indices[lo:hi].long()
            if sampled:  # few slots per row: score only the slots (SDDMM)
                pattern = _csr(
                    torch.arange(0, (hi - lo) * K + 1, K, device=x.device),
                    ids.reshape(-1),
                    torch.zeros((hi - lo) * K, dtype=acc, device=x.device),
                    (hi - lo, D),
                )
                sampled = torch.sparse.sampled_addmm(pattern, g[:, lo:hi].t().contiguous(), xa, beta=0.0)
                grad_w[lo:hi] = sampled.values().view(hi - lo, K).to(weight.dtype)
            else:
                dense = g[:, lo:hi].t() @ xa  # (chunk, D)
                grad_w[lo:hi] = dense.gather(1, ids).to(weight.dtype)
    grad_b = g.sum(dim=0).to(weight.dtype) if need_b else None
    return (grad_x.t().to(x.dtype) if need_x else None), grad_w, grad_b


# ----------------------------------------------------------------------------------------------------------
# Dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


def use_triton(backend: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``auto``: Triton when x is on CUDA in a dtype the kernels take, else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return triton is not None and x.is_cuda and x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES
    return backend == "triton"


def fixed_fanin_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out (B, L): the layer applied to x (B, D); ``backend`` is ``auto``, ``triton`` or ``reference``."""
    if use_triton(backend, x, weight):
        return fixed_fanin_forward_triton(x, weight, indices, bias)
    return fixed_fanin_forward_reference(x, weight, indices, bias)


def fixed_fanin_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    col_ptr: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_w, grad_b), None where not needed. The Triton path computes the CSC transpose on
    demand when ``col_ptr`` / ``slots`` are None (a sort of L * K ids: cache it instead); the reference
    ignores it."""
    if use_triton(backend, x, weight):
        if need_x and (col_ptr is None or slots is None):
            col_ptr, slots = column_transpose(indices, x.shape[1])
        return fixed_fanin_backward_triton(
            grad_out, x, weight, indices, col_ptr, slots, need_x, need_w, need_b
        )
    transpose = (col_ptr, slots) if col_ptr is not None and slots is not None else None
    return fixed_fanin_backward_reference(grad_out, x, weight, indices, need_x, need_w, need_b, transpose)


class FixedFanInFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, weight, indices, bias, col_ptr, slots, backend)`` -> out (B, L).

    ``col_ptr`` / ``slots`` (from ``column_transpose``) may be None; ``indices`` gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, indices, bias, col_ptr, slots, backend):
        ctx.save_for_backward(x, weight, indices, col_ptr, slots)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.backend = backend
        return fixed_fanin_forward(x, weight, indices, bias, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices, col_ptr, slots = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            grad_x, grad_w, grad_b = fixed_fanin_backward(
                grad_out, x, weight, indices, col_ptr, slots, need_x, need_w, need_b, backend=ctx.backend
            )
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, None, grad_b, None, None, None


def fixed_fanin(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    transpose: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable fixed fan-in layer: x (B, D) -> (B, L). ``transpose`` is the cached
    ``column_transpose(indices, D)`` pair (``col_ptr``, ``slots``), or None to build it when needed."""
    col_ptr, slots = transpose if transpose is not None else (None, None)
    return FixedFanInFunction.apply(x, weight, indices, bias, col_ptr, slots, backend)
