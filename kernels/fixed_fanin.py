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
recomputes it only when the ids change (after SET rewiring). The transpose and the input-gradient kernel
live in :mod:`xmc.kernels.fanin_common`: the grouped layer and the fused loss use them too.

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

The gathers (B * L * K elements) dominate every kernel; the floor is reading weights and ids once. The
grouped layer (:mod:`xmc.kernels.grouped_fanin`: one id row per group of labels) and the fused loss
(:mod:`xmc.kernels.fixed_fanin_loss`) close part of that gap; keeping x on chip is future work.

Offsets: any of L * K, B * L may exceed 2**31, so program ids and row offsets are cast to int64 before they
meet a stride. Column ids stay 32-bit (they only index the small x).

Every kernel has a plain-PyTorch twin (``fixed_fanin_forward_reference`` /
``fixed_fanin_backward_reference`` in :mod:`xmc.kernels.fixed_fanin_reference`), chunked over labels so memory
stays bounded at millions of labels; it is the CPU path and the test oracle."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from xmc.kernels._common import TRITON_DTYPES, block, new_output, require_triton, tl, triton, use_triton
from xmc.kernels._common import jit as _jit
from xmc.kernels.fanin_common import check_grad_out, check_layer, column_transpose, input_gradient_in_ranges
from xmc.kernels.fixed_fanin_reference import fixed_fanin_backward_reference, fixed_fanin_forward_reference

__all__ = [
    "FixedFanInFunction",
    "fixed_fanin",
    "fixed_fanin_backward",
    "fixed_fanin_backward_triton",
    "fixed_fanin_forward",
    "fixed_fanin_forward_triton",
    "fixed_fanin_input_gradient_triton",
    "use_triton",  # from xmc.kernels._common, for the classifier's dispatch
]

# Block sizes. Forward and weight gradient: (BLOCK_L labels, up to 128 batch rows) per program, the batch
# contiguous in each gathered row of x^T, UNROLL slots' gathers in flight (the input gradient's tiles are in
# xmc.kernels.fanin_common). Measured on an H100 in benchmarks/bench_fixed_fanin.py.
_FWD_BLOCK_L, _FWD_MAX_BLOCK_B, _UNROLL = 64, 128, 4
_BWD_W_BLOCK_L, _BWD_W_MAX_BLOCK_B = 64, 128


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
# Triton launchers
# ----------------------------------------------------------------------------------------------------------


def fixed_fanin_forward_triton(
    x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton forward: x (B, D), weight (L, K), indices (L, K) int16/int32, bias (L,) or None -> out (B, L) in
    x's dtype. Floats are bf16 / fp16 / fp32 (fp32 accumulation); all tensors on one device."""
    require_triton()
    check_layer(x, weight, indices, bias, triton_path=True)
    x, weight, indices = x.contiguous(), weight.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, L, K = x.shape[0], weight.shape[0], weight.shape[1]
    out = new_output((B, L), x.dtype, x.device)
    if out.numel() == 0:
        return out
    xt = x.t().contiguous()  # (D, B): a slot's B inputs are contiguous
    block_b = block(B, _FWD_MAX_BLOCK_B)
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
    require_triton()
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
    grad_x = new_output((B, D), x.dtype, x.device)
    if grad_x.numel():
        grad_x.copy_(
            input_gradient_in_ranges(
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
    require_triton()
    check_layer(x, weight, indices, None, triton_path=True)
    check_grad_out(grad_out, x, weight, TRITON_DTYPES)
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
        grad_w = new_output((L, K), weight.dtype, weight.device)
    if need_b:
        grad_b = new_output((L,), weight.dtype, weight.device)
    if (need_w and grad_w.numel()) or (need_b and grad_b.numel()):
        xt = x.t().contiguous()  # (D, B)
        block_b = block(B, _BWD_W_MAX_BLOCK_B)
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
# Dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


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
