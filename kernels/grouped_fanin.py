"""Grouped fan-in sparse layer: labels in groups of G share one set of K input columns (HASTE's layout).

The layer stores values ``weight (L, K)``, one id row per group ``indices (n, K)`` with ``n = ceil(L / G)``
(int16 or int32, distinct within a row; the last group may hold fewer than G labels), and an optional
``bias (L,)``. Label ``l`` belongs to group ``g = l // G`` and reads the columns ``idx[g, :]``. For x (B, D):

    forward        out[b, l]        = sum_j w[l, j] * x[b, idx[l // G, j]]  (+ bias[l])
    input grad     grad_x[b, d]     = sum over group slots (g, j) with idx[g, j] == d of  p[g, j, b]
                   p[g, j, b]       = sum_{l in g} w[l, j] * grad_out[b, l]
    weight grad    grad_w[l, j]     = sum_b grad_out[b, l] * x[b, idx[l // G, j]]
    bias grad      grad_b[l]        = sum_b grad_out[b, l]

With X_g = x[:, idx[g]] (B, K) the gathered inputs of a group, its G labels are three small dense products,
which run on tensor cores through ``tl.dot``:

    out[:, g]  = X_g @ W_g^T        p[g]  = W_g^T @ grad_out[:, g]^T        grad_W_g = grad_out[:, g]^T @ X_g

Precision. ``tl.dot`` takes both operands in one dtype: when the activations (x in forward, grad_out in the
input gradient) are bf16 / fp16, the weights are rounded to that dtype for the product, as ``torch.autocast``
does for a dense layer; fp32 operands multiply in full fp32 (``input_precision="ieee"``, no TF32). Every
product accumulates in fp32.

The input gradient in two passes, deterministic and without atomics. Pass 1 writes ``p`` for a range of
groups into an fp32 buffer (rows ``(g - g0) * K + j``, B columns; at most 32 MiB, so it stays in L2). Pass 2
is the fixed fan-in input-gradient kernel (:mod:`xmc.kernels.fanin_common`) over the column transpose of the
group ids, with every weight 1: for each column d it gathers the rows of ``p`` whose slot holds d.

Memory traffic (s_x, s_w, s_g: bytes per element of x, weight, grad_out; s_i: bytes per id, n = L / G):

    forward      weight L * K * s_w, ids n * K * s_i (once per batch block of up to 128 rows),
                 x gathers B * n * K * s_x (from L2: G times fewer than the plain layer), out B * L * s_o
    input grad   grad_out B * L * s_g, weight L * K * s_w, p 2 * B * n * K * 4 (written, gathered),
                 CSC slot ids n * K * 4
    weight grad  ids n * K * s_i, x gathers B * n * K * s_x, grad_out B * L * s_g, grad_w L * K * s_w

The plain-PyTorch twin (``grouped_fanin_forward_reference`` / ``grouped_fanin_backward_reference`` in
:mod:`xmc.kernels.grouped_fanin_reference`) runs a range of groups at a time as batched matrix products; it is
the CPU path and the test oracle. A grouped layer
with G = 1 is the plain fixed fan-in layer.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable
from xmc.kernels._common import TRITON_DTYPES, block, new_output, require_triton, tl, triton, use_triton
from xmc.kernels._common import jit as _jit
from xmc.kernels.fanin_common import (
    BWD_X_CHUNK_BYTES,
    check_grad_out,
    check_layer,
    column_transpose,
    gather_input_gradient,
    input_gradient_splits,
    search_steps,
)
from xmc.kernels.grouped_fanin_reference import (
    grouped_fanin_backward_reference,
    grouped_fanin_forward_reference,
)

__all__ = [
    "GROUP_BUFFER_BYTES",
    "GroupedFanInFunction",
    "grouped_fanin",
    "grouped_fanin_backward",
    "grouped_fanin_backward_triton",
    "grouped_fanin_forward",
    "grouped_fanin_forward_triton",
    "grouped_fanin_input_gradient_triton",
    "num_groups",
]

# Block sizes: one group (G labels, padded to at least 16 for tl.dot) per program, the batch in blocks of
# up to 128 rows, the K slots in blocks of up to 64.
_MAX_BLOCK_B, _MAX_BLOCK_K, _MIN_DOT = 128, 64, 16
# The input gradient's per-slot products of a range of groups (fp32; small enough to stay in L2).
GROUP_BUFFER_BYTES = BWD_X_CHUNK_BYTES


def num_groups(num_labels: int, group: int) -> int:
    """Id rows of a grouped layer: ``ceil(L / G)``."""
    return -(-num_labels // group)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@_jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32: with both operands in b's 16-bit dtype (a rounded to it, as
    autocast rounds a dense layer's weight) when LOW_PRECISION, else in full fp32 (no TF32)."""
    if LOW_PRECISION:
        out = tl.dot(a.to(b.dtype), b, acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return out


@_jit
def _grouped_fanin_fwd_kernel(
    xt_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    out_ptr,
    B,
    L,
    K,
    G,
    stride_xd,
    stride_xb,
    stride_wl,
    stride_wk,
    stride_ig,
    stride_ik,
    stride_ob,
    stride_ol,
    HAS_BIAS: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: out[b, l] for one group's labels x BLOCK_B batch rows, as (W_g @ X_g^T) tiles.
    ``xt`` is x transposed (D, B): a slot's B inputs are one contiguous row."""
    pid_g = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    offs_i = tl.arange(0, BLOCK_G)
    labels = pid_g * G + offs_i  # (BLOCK_G,) int64
    mask_l = (offs_i < G) & (labels < L)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B

    acc = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        cols = tl.load(idx_ptr + pid_g * stride_ig + offs_k * stride_ik, mask=mask_k, other=0).to(tl.int32)
        xv = tl.load(
            xt_ptr + cols[:, None] * stride_xd + offs_b[None, :] * stride_xb,
            mask=mask_k[:, None] & mask_b[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_B)
        w = tl.load(
            w_ptr + labels[:, None] * stride_wl + offs_k[None, :] * stride_wk,
            mask=mask_l[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_G, BLOCK_K)
        acc = _dot(w, xv, acc, LOW_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + labels, mask=mask_l, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    out_offs = offs_b.to(tl.int64)[None, :] * stride_ob + labels[:, None] * stride_ol
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_l[:, None] & mask_b[None, :])


@_jit
def _grouped_fanin_bwd_p_kernel(
    grad_out_ptr,
    w_ptr,
    p_ptr,
    B,
    L,
    K,
    G,
    group0,
    stride_gb,
    stride_gl,
    stride_wl,
    stride_wk,
    stride_pr,
    stride_pb,
    LOW_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: p rows of group ``group0 + program_id(0)`` (K rows of the buffer, one per slot) for
    BLOCK_B batch rows: p[g] = W_g^T @ grad_out[:, g]^T, a (K, G) @ (G, B) product."""
    pid_g = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    offs_i = tl.arange(0, BLOCK_G)
    labels = (group0 + pid_g) * G + offs_i
    mask_l = (offs_i < G) & (labels < L)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    g = tl.load(
        grad_out_ptr + labels[:, None] * stride_gl + offs_b.to(tl.int64)[None, :] * stride_gb,
        mask=mask_l[:, None] & mask_b[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_B)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        wt = tl.load(
            w_ptr + labels[None, :] * stride_wl + offs_k[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_l[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_G)
        p = _dot(wt, g, tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32), LOW_PRECISION)
        rows = pid_g * K + offs_k
        tl.store(
            p_ptr + rows[:, None] * stride_pr + offs_b[None, :] * stride_pb,
            p,
            mask=mask_k[:, None] & mask_b[None, :],
        )


@_jit
def _grouped_fanin_bwd_w_kernel(
    grad_out_ptr,
    xt_ptr,
    idx_ptr,
    grad_w_ptr,
    grad_b_ptr,
    B,
    L,
    K,
    G,
    stride_gb,
    stride_gl,
    stride_xd,
    stride_xb,
    stride_ig,
    stride_ik,
    stride_wl,
    stride_wk,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: grad_w of one group's labels (BLOCK_G x K, in blocks of BLOCK_K slots) as
    grad_out[:, g]^T @ X_g over the batch, and their grad_b. Programs own disjoint outputs: no races."""
    pid_g = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_G)
    labels = pid_g * G + offs_i
    mask_l = (offs_i < G) & (labels < L)
    offs_b = tl.arange(0, BLOCK_B)
    if NEED_B:
        acc_b = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            ob = b0 + offs_b
            g = tl.load(
                grad_out_ptr + labels[:, None] * stride_gl + ob.to(tl.int64)[None, :] * stride_gb,
                mask=mask_l[:, None] & (ob < B)[None, :],
                other=0.0,
            )
            acc_b += tl.sum(g.to(tl.float32), axis=1)
        tl.store(grad_b_ptr + labels, acc_b.to(grad_b_ptr.dtype.element_ty), mask=mask_l)
    if NEED_W:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            cols = tl.load(idx_ptr + pid_g * stride_ig + offs_k * stride_ik, mask=mask_k, other=0).to(
                tl.int32
            )
            acc = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float32)
            for b0 in range(0, B, BLOCK_B):
                ob = b0 + offs_b
                mask_b = ob < B
                g = tl.load(
                    grad_out_ptr + labels[:, None] * stride_gl + ob.to(tl.int64)[None, :] * stride_gb,
                    mask=mask_l[:, None] & mask_b[None, :],
                    other=0.0,
                )  # (BLOCK_G, BLOCK_B)
                xv = tl.load(
                    xt_ptr + cols[None, :] * stride_xd + ob[:, None] * stride_xb,
                    mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0,
                )  # (BLOCK_B, BLOCK_K)
                acc = _dot(g, xv, acc, LOW_PRECISION)
            tl.store(
                grad_w_ptr + labels[:, None] * stride_wl + offs_k[None, :] * stride_wk,
                acc.to(grad_w_ptr.dtype.element_ty),
                mask=mask_l[:, None] & mask_k[None, :],
            )


# ----------------------------------------------------------------------------------------------------------
# Dot precision and block sizes
# ----------------------------------------------------------------------------------------------------------


def _low_precision(t: torch.Tensor) -> bool:
    """Whether ``tl.dot`` takes the operands in ``t``'s 16-bit dtype. Triton's CPU interpreter misreads
    16-bit ``tl.dot`` operands (seen with triton 3.9: bf16 products come out near 1e10), so interpreted
    launches upcast them and multiply in fp32."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return t.dtype in (torch.bfloat16, torch.float16) and not interpreted


def _blocks(B: int, G: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_G, BLOCK_K): powers of two, at least 16 each (tl.dot's smallest tile)."""
    return (
        max(_MIN_DOT, block(B, _MAX_BLOCK_B)),
        max(_MIN_DOT, triton.next_power_of_2(G)),
        max(_MIN_DOT, block(K, _MAX_BLOCK_K)),
    )


# ----------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------


def grouped_fanin_forward_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton forward: x (B, D), weight (L, K), indices (ceil(L / G), K) int16/int32, bias (L,) or None ->
    out (B, L) in x's dtype."""
    require_triton()
    check_layer(x, weight, indices, bias, triton_path=True, group=group)
    x, weight, indices = x.contiguous(), weight.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, (L, K) = x.shape[0], weight.shape
    out = new_output((B, L), x.dtype, x.device)
    if out.numel() == 0:
        return out
    xt = x.t().contiguous()  # (D, B)
    block_b, block_g, block_k = _blocks(B, group, K)
    _grouped_fanin_fwd_kernel[(indices.shape[0], triton.cdiv(B, block_b))](
        xt,
        weight,
        indices,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        B,
        L,
        K,
        group,
        xt.stride(0),
        xt.stride(1),
        weight.stride(0),
        weight.stride(1),
        indices.stride(0),
        indices.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        LOW_PRECISION=_low_precision(x),
        BLOCK_B=block_b,
        BLOCK_G=block_g,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


def grouped_fanin_input_gradient_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    group: int,
    col_ptr: torch.Tensor,
    slots: torch.Tensor,
    row_start: int = 0,
) -> torch.Tensor:
    """Triton input gradient of a block of labels: grad_x (B, D) in x's dtype from ``grad_out`` (B, n), the
    gradients of labels ``row_start .. row_start + n - 1`` (``row_start`` a multiple of G) of the layer whose
    whole ``weight`` (L, K) and group-id ``column_transpose`` (``col_ptr``, ``slots``) are given."""
    require_triton()
    B, D = x.shape
    L, K = weight.shape
    n = grad_out.shape[1] if grad_out.dim() == 2 else -1
    if grad_out.dim() != 2 or grad_out.shape[0] != B or not 0 <= row_start <= L - n or row_start % group:
        raise ValueError(
            f"grad_out must be (B, n) = ({B}, n) for labels row_start .. row_start + n - 1 within L = {L}, "
            f"row_start a multiple of G = {group}; got {tuple(grad_out.shape)} at row_start {row_start}"
        )
    if grad_out.dtype not in TRITON_DTYPES or x.dtype not in TRITON_DTYPES:
        raise ValueError(f"grad_out and x must be one of {TRITON_DTYPES}, got {grad_out.dtype} and {x.dtype}")
    if col_ptr.shape != (D + 1,) or col_ptr.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError("col_ptr / slots must be column_transpose(indices, D) of the layer's group ids")
    grad_x = new_output((B, D), x.dtype, x.device)
    if grad_x.numel() == 0:
        return grad_x
    if n == 0:
        return grad_x.zero_()
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    col_ptr, slots = col_ptr.contiguous(), slots.contiguous()
    # Pass 1 fills p for a range of groups at a time (an fp32 buffer of at most GROUP_BUFFER_BYTES); pass 2
    # gathers, per column, the p rows of that range whose slot holds the column (weights all 1).
    first_group, end_group = row_start // group, num_groups(row_start + n, group)
    per_range = max(1, GROUP_BUFFER_BYTES // (K * B * 4))
    block_b, block_g, block_k = _blocks(B, group, K)
    steps = search_steps(slots.numel())
    splits = input_gradient_splits(min(per_range, end_group - first_group) * K, D)
    ones = torch.ones(1, dtype=torch.float32, device=x.device)
    parts = new_output((splits, B, D), torch.float32, x.device)
    total = torch.zeros((B, D), dtype=torch.float32, device=x.device)
    for g0 in range(first_group, end_group, per_range):
        g1 = min(end_group, g0 + per_range)
        p = new_output(((g1 - g0) * K, B), torch.float32, x.device)
        # grad_out's column 0 is label row_start = first_group * G.
        _grouped_fanin_bwd_p_kernel[(g1 - g0, triton.cdiv(B, block_b))](
            grad_out,
            weight[row_start:],
            p,
            B,
            n,
            K,
            group,
            g0 - first_group,
            grad_out.stride(0),
            grad_out.stride(1),
            weight.stride(0),
            weight.stride(1),
            p.stride(0),
            p.stride(1),
            LOW_PRECISION=_low_precision(grad_out),
            BLOCK_B=block_b,
            BLOCK_G=block_g,
            BLOCK_K=block_k,
            num_warps=4,
        )
        total += gather_input_gradient(
            p, ones, col_ptr, slots, parts, 1, g0 * K, g1 * K, steps, weight_strides=(0, 0)
        )  # a pass-2 row is one group slot
    return grad_x.copy_(total)


def grouped_fanin_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    col_ptr: torch.Tensor | None,
    slots: torch.Tensor | None,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: grad_out (B, L) -> (grad_x (B, D) in x's dtype, grad_w (L, K) and grad_b (L,) in the
    weight's dtype), None for what is not needed. ``col_ptr`` / ``slots`` are
    ``column_transpose(indices, D)`` of the group ids, required only when ``need_x``."""
    require_triton()
    check_layer(x, weight, indices, None, triton_path=True, group=group)
    check_grad_out(grad_out, x, weight, TRITON_DTYPES)
    grad_out, x, weight, indices = (
        grad_out.contiguous(),
        x.contiguous(),
        weight.contiguous(),
        indices.contiguous(),
    )
    grad_x = None
    if need_x:
        if col_ptr is None or slots is None:
            raise ValueError("the input gradient needs col_ptr and slots: pass column_transpose(indices, D)")
        grad_x = grouped_fanin_input_gradient_triton(grad_out, x, weight, group, col_ptr, slots)
    grad_w, grad_b = _weight_gradient_triton(grad_out, x, weight, indices, group, need_w, need_b)
    return grad_x, grad_w, grad_b


def _weight_gradient_triton(grad_out, x, weight, indices, group, need_w, need_b):
    B, (L, K) = x.shape[0], weight.shape
    grad_w = new_output((L, K), weight.dtype, weight.device) if need_w else None
    grad_b = new_output((L,), weight.dtype, weight.device) if need_b else None
    if L == 0 or not (need_w or need_b):
        return grad_w, grad_b
    if B == 0:
        return (grad_w.zero_() if need_w else None), (grad_b.zero_() if need_b else None)
    xt = x.t().contiguous()
    block_b, block_g, block_k = _blocks(B, group, K)
    _grouped_fanin_bwd_w_kernel[(indices.shape[0],)](
        grad_out,
        xt,
        indices,
        grad_w if need_w else weight,  # placeholders are never written
        grad_b if need_b else weight,
        B,
        L,
        K,
        group,
        grad_out.stride(0),
        grad_out.stride(1),
        xt.stride(0),
        xt.stride(1),
        indices.stride(0),
        indices.stride(1),
        weight.stride(0),  # grad_w is a fresh contiguous (L, K) tensor: the weight's strides
        weight.stride(1),
        NEED_W=need_w,
        NEED_B=need_b,
        LOW_PRECISION=_low_precision(x) and _low_precision(grad_out),
        BLOCK_B=block_b,
        BLOCK_G=block_g,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return grad_w, grad_b


# ----------------------------------------------------------------------------------------------------------
# Dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


def grouped_fanin_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out (B, L): the grouped layer applied to x (B, D); ``backend`` is ``auto``, ``triton`` or
    ``reference``."""
    if use_triton(backend, x, weight):
        return grouped_fanin_forward_triton(x, weight, indices, group, bias)
    return grouped_fanin_forward_reference(x, weight, indices, group, bias)


def grouped_fanin_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    col_ptr: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_w, grad_b), None where not needed. The Triton path builds the group ids' column
    transpose when ``col_ptr`` / ``slots`` are None (cache it instead); the reference needs none."""
    if use_triton(backend, x, weight):
        if need_x and (col_ptr is None or slots is None):
            col_ptr, slots = column_transpose(indices, x.shape[1])
        return grouped_fanin_backward_triton(
            grad_out, x, weight, indices, group, col_ptr, slots, need_x, need_w, need_b
        )
    return grouped_fanin_backward_reference(grad_out, x, weight, indices, group, need_x, need_w, need_b)


class GroupedFanInFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, weight, indices, group, bias, col_ptr, slots, backend)`` -> out (B, L);
    ``indices`` gets no gradient, ``col_ptr`` / ``slots`` may be None."""

    @staticmethod
    def forward(ctx, x, weight, indices, group, bias, col_ptr, slots, backend):
        ctx.save_for_backward(x, weight, indices, col_ptr, slots)
        ctx.group, ctx.backend = group, backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return grouped_fanin_forward(x, weight, indices, group, bias, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices, col_ptr, slots = ctx.saved_tensors
        need_x, need_w, _, _, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            grad_x, grad_w, grad_b = grouped_fanin_backward(
                grad_out, x, weight, indices, ctx.group, col_ptr, slots, need_x, need_w, need_b, ctx.backend
            )
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, None, None, grad_b, None, None, None


def grouped_fanin(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    transpose: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable grouped fan-in layer: x (B, D) -> (B, L). ``transpose`` is the cached
    ``column_transpose(indices, D)`` of the group ids, or None to build it when needed."""
    col_ptr, slots = transpose if transpose is not None else (None, None)
    return GroupedFanInFunction.apply(x, weight, indices, group, bias, col_ptr, slots, backend)
