"""Fused loss of a fixed fan-in layer: logits, loss and every gradient of a label range in one pass.

For a batch x (B, D), the layer's labels ``r0 .. r1 - 1`` and the batch's positives among them, the op returns
the summed loss and its gradients scaled by ``scale`` (the caller's 1 / (B L) of a mean):

    z[b, l]      = sum_j w[l, j] * x[b, idx[l, j]] + bias[l]
    loss         = sum_{b, l} f(z[b, l], y[b, l])
    g[b, l]      = scale * f'(z[b, l], y[b, l])
    grad_w[l, j] = sum_b g[b, l] x[b, idx[l, j]]      grad_b[l] = sum_b g[b, l]      grad_x = g W (CSC view)

with BCE ``f = softplus(z) - y z`` (``f' = sigmoid(z) - y``) or the squared hinge ``f = max(0, 1 - s z)^2``
(``f' = -2 s max(0, 1 - s z)``, ``s = 2 y - 1``).

One program owns BLOCK_L labels and a tile of up to 128 documents: it gathers its logits tile, marks the
tile's positives (found by binary search in the positives sorted by label), evaluates the loss and its
gradient in registers, writes the gradient's bias and weight parts (larger batches run tile after tile, each
adding its part to fp32 sums, so a batch of any size takes the fused path), and writes the gradient transposed
into a label range's buffer (at most 32 MiB, L2-resident), from which the fixed fan-in input-gradient kernel
(:mod:`xmc.kernels.fanin_common`) adds the range's share of grad_x. Neither the B x L logits, nor targets, nor
the full B x L gradient ever exist: the only B x L-sized traffic is that buffer. Each program writes its loss
partial sum to its own slot (summed on the host in a fixed order: deterministic).

Memory traffic per label range (s_w, s_i, s_x: bytes of a weight, an id, an activation): weights and ids
L K (s_w + s_i) once, x gathers B L K s_x (from L2) twice (logits, weight gradient), the gradient buffer
B L s_x written and read by the input gradient, grad_w / grad_b L (K + 1) s_w written.

The reference twin (``fixed_fanin_loss_reference``) runs the same computation with the PyTorch references of
the layer and :func:`xmc.kernels.losses.chunk_loss_and_grad`; it is the CPU path and the test oracle.
"""

from __future__ import annotations

import torch
from xmc.kernels._common import TRITON_DTYPES, block, new_output, require_triton, tl, triton
from xmc.kernels._common import jit as _jit
from xmc.kernels.fanin_common import (
    BWD_X_CHUNK_BYTES,
    gather_input_gradient,
    input_gradient_splits,
    lower_bound,
    search_steps,
)
from xmc.kernels.fixed_fanin_reference import fixed_fanin_backward_reference, fixed_fanin_forward_reference
from xmc.kernels.losses import LOSSES, chunk_loss_and_grad

__all__ = ["MAX_BATCH", "fixed_fanin_loss_reference", "fixed_fanin_loss_triton"]

MAX_BATCH = 128  # a program holds a tile of this many documents of its labels (larger batches: tile by tile)
_BLOCK_L = 32


@_jit(do_not_specialize=["label0", "nnz", "steps", "b0"])
def _fixed_fanin_loss_kernel(
    xt_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    pos_label_ptr,
    pos_row_ptr,
    gt_ptr,
    grad_w_ptr,
    grad_b_ptr,
    partial_ptr,
    B,
    n,
    K,
    label0,
    nnz,
    steps,
    b0,
    scale,
    stride_xd,
    stride_xb,
    stride_wl,
    stride_wk,
    stride_il,
    stride_ik,
    stride_gr,
    stride_gb,
    HAS_BIAS: tl.constexpr,
    SQUARED_HINGE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program: labels pid * BLOCK_L .. (+ BLOCK_L) of a range of n, with documents b0 .. b0 + BLOCK_B - 1
    of the batch. ``w``, ``idx``, ``bias``, ``grad_w`` and ``grad_b`` point at the range's first label;
    ``gt`` is the range's (n, B) gradient buffer; the positives are all of the call's (label, row) pairs
    sorted by label, labels counted from ``label0`` labels before the range (binary search finds the
    range's own: no host sync). ``ACCUMULATE``: add this tile's weight and bias gradients to what
    ``grad_w`` / ``grad_b`` hold (fp32 sums over the batch's tiles) instead of writing them."""
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # labels counted from the range's first
    mask_l = local < n
    offs_b = b0 + tl.arange(0, BLOCK_B)  # documents of this tile, counted in the whole batch
    mask_b = offs_b < B
    mask = mask_l[:, None] & mask_b[None, :]
    w_rows = w_ptr + local * stride_wl
    i_rows = idx_ptr + local * stride_il

    z = tl.zeros((BLOCK_L, BLOCK_B), dtype=tl.float32)
    for k in range(0, K):
        w = tl.load(w_rows + k * stride_wk, mask=mask_l, other=0.0).to(tl.float32)
        cols = tl.load(i_rows + k * stride_ik, mask=mask_l, other=0).to(tl.int32)
        xv = tl.load(xt_ptr + cols[:, None] * stride_xd + offs_b[None, :] * stride_xb, mask=mask, other=0.0)
        z += w[:, None] * xv.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + local, mask=mask_l, other=0.0).to(tl.float32)[:, None]

    # The tile's positives: each label's run in the label-sorted pairs, found by binary search.
    zero = tl.zeros((BLOCK_L,), dtype=tl.int64)
    first = lower_bound(pos_label_ptr, zero, zero + nnz, local + label0, steps)
    last = lower_bound(pos_label_ptr, first, zero + nnz, local + label0 + 1, steps)
    count = tl.where(mask_l, last - first, 0)
    y = tl.zeros((BLOCK_L, BLOCK_B), dtype=tl.int1)
    for j in range(0, tl.max(count, axis=0)):
        row = tl.load(pos_row_ptr + first + j, mask=j < count, other=-1)
        y = y | (offs_b[None, :] == row[:, None])

    if SQUARED_HINGE:
        sign = tl.where(y, 1.0, -1.0)
        margin = tl.maximum(1.0 - sign * z, 0.0)
        loss = margin * margin
        g = -2.0 * sign * margin
    else:
        # softplus(z) - y z, stably: max(z, 0) + log(1 + exp(-|z|))
        loss = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))) - tl.where(y, z, 0.0)
        g = 1.0 / (1.0 + tl.exp(-z)) - tl.where(y, 1.0, 0.0)
    loss = tl.where(mask, loss, 0.0)
    g = tl.where(mask, g * scale, 0.0)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(loss, axis=1), axis=0))

    tl.store(
        gt_ptr + local[:, None] * stride_gr + offs_b[None, :] * stride_gb,
        g.to(gt_ptr.dtype.element_ty),
        mask=mask,
    )
    if HAS_BIAS:
        gb = tl.sum(g, axis=1)
        if ACCUMULATE:
            gb += tl.load(grad_b_ptr + local, mask=mask_l, other=0.0)
        tl.store(grad_b_ptr + local, gb.to(grad_b_ptr.dtype.element_ty), mask=mask_l)
    gw_rows = grad_w_ptr + local * stride_wl
    for k in range(0, K):
        cols = tl.load(i_rows + k * stride_ik, mask=mask_l, other=0).to(tl.int32)
        xv = tl.load(xt_ptr + cols[:, None] * stride_xd + offs_b[None, :] * stride_xb, mask=mask, other=0.0)
        gw = tl.sum(g * xv.to(tl.float32), axis=1)
        if ACCUMULATE:
            gw += tl.load(gw_rows + k * stride_wk, mask=mask_l, other=0.0)
        tl.store(gw_rows + k * stride_wk, gw.to(grad_w_ptr.dtype.element_ty), mask=mask_l)


def _sorted_positives(
    rows: torch.Tensor, cols: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, rows) of the distinct positive pairs, sorted by label then row (int64)."""
    order = torch.argsort(cols.long() * batch + rows.long())
    return cols.long()[order].contiguous(), rows.long()[order].contiguous()


def fixed_fanin_loss_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    kind: str,
    scale: float,
    col_ptr: torch.Tensor | None,
    slots: torch.Tensor | None,
    row_start: int,
    row_stop: int,
    need_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Fused loss of labels ``row_start .. row_stop - 1`` of a layer (whole ``weight`` / ``indices`` (L, K),
    ``bias`` (L,) or None) on x (B, D), any B (tiles of ``MAX_BATCH`` documents, their weight and bias
    gradients summed in fp32); the positives are the distinct pairs ``(rows, cols)``, cols counted from
    ``row_start``.

    Returns ``(loss_sum, grad_x, grad_w, grad_b)``: the summed loss (fp32 scalar, unscaled), grad_x (B, D) in
    fp32 (None unless ``need_x``; needs the whole layer's ``column_transpose`` as ``col_ptr`` / ``slots``),
    grad_w (n, K) in the weight's dtype and grad_b (n,) in the bias's dtype; every gradient is times
    ``scale``."""
    require_triton()
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
    B, D = x.shape
    L, K = weight.shape
    if not 0 <= row_start <= row_stop <= L:
        raise ValueError(f"labels {row_start}..{row_stop - 1} are not within L = {L}")
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"x and weight must be one of {TRITON_DTYPES}, got {x.dtype} and {weight.dtype}")
    if need_x and (col_ptr is None or slots is None):
        raise ValueError("the input gradient needs the layer's column_transpose (col_ptr, slots)")
    n = row_stop - row_start
    device = x.device
    grad_w = new_output((n, K), weight.dtype, device)
    grad_b = new_output((n,), bias.dtype, device) if bias is not None else None
    grad_x = torch.zeros((B, D), dtype=torch.float32, device=device) if need_x else None
    if n == 0 or B == 0:
        return (
            torch.zeros((), device=device),
            grad_x,
            grad_w.zero_(),
            (grad_b.zero_() if bias is not None else None),
        )
    xt = x.t().contiguous()  # (D, B)
    weight, indices = weight.contiguous(), indices.contiguous()
    pos_labels, pos_rows = _sorted_positives(rows, cols, B)
    nnz = pos_labels.numel()
    if nnz == 0:  # a pointer to one unread element stands for the empty list
        pos_labels = pos_rows = torch.zeros(1, dtype=torch.int64, device=device)
    steps = search_steps(nnz)
    block_b = max(16, block(B, MAX_BATCH))
    tiles = range(0, B, block_b)
    tiled = len(tiles) > 1
    # Tiles add their parts: into fp32 sums, cast to the parameters' dtypes once at the end.
    sum_w = torch.zeros((n, K), dtype=torch.float32, device=device) if tiled else grad_w
    sum_b = (
        None if bias is None else (torch.zeros((n,), dtype=torch.float32, device=device) if tiled else grad_b)
    )
    per_range = max(_BLOCK_L, BWD_X_CHUNK_BYTES // (B * x.element_size()) // _BLOCK_L * _BLOCK_L)
    gt = new_output((min(per_range, n), B), x.dtype, device)
    programs = triton.cdiv(min(per_range, n), _BLOCK_L)
    partials = new_output((triton.cdiv(n, per_range), len(tiles), programs), torch.float32, device)
    x_steps = search_steps(L * K)
    splits = input_gradient_splits(min(per_range, n) * K, D)
    parts = new_output((splits, B, D), torch.float32, device) if need_x else None
    for i, r0 in enumerate(range(0, n, per_range)):
        r1 = min(n, r0 + per_range)
        grid = (triton.cdiv(r1 - r0, _BLOCK_L),)
        partials[i, :, grid[0] :].zero_()
        for t, b0 in enumerate(tiles):
            _fixed_fanin_loss_kernel[grid](
                xt,
                weight[row_start + r0 :],
                indices[row_start + r0 :],
                bias[row_start + r0 :] if bias is not None else weight,  # never read without HAS_BIAS
                pos_labels,
                pos_rows,
                gt,
                sum_w[r0:],
                sum_b[r0:] if bias is not None else sum_w,
                partials[i, t],
                B,
                r1 - r0,
                K,
                r0,
                nnz,
                steps,
                b0,
                scale,
                xt.stride(0),
                xt.stride(1),
                weight.stride(0),
                weight.stride(1),
                indices.stride(0),
                indices.stride(1),
                gt.stride(0),
                gt.stride(1),
                HAS_BIAS=bias is not None,
                SQUARED_HINGE=kind == "squared_hinge",
                ACCUMULATE=tiled,
                BLOCK_B=block_b,
                BLOCK_L=_BLOCK_L,
                num_warps=4,
            )
        if need_x:
            grad_x += gather_input_gradient(
                gt, weight, col_ptr, slots, parts, K, row_start + r0, row_start + r1, x_steps
            )
    if tiled:
        grad_w.copy_(sum_w)
        if bias is not None:
            grad_b.copy_(sum_b)
    return partials.sum(), grad_x, grad_w, grad_b


def fixed_fanin_loss_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    kind: str,
    scale: float,
    row_start: int,
    row_stop: int,
    need_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The contract of ``fixed_fanin_loss_triton`` (any B, float64 too) through the layer's PyTorch
    references: logits, :func:`xmc.kernels.losses.chunk_loss_and_grad`, then the backward."""
    w, ids = weight[row_start:row_stop], indices[row_start:row_stop]
    b = bias[row_start:row_stop] if bias is not None else None
    logits = fixed_fanin_forward_reference(x, w, ids, b)
    total, g = chunk_loss_and_grad(logits, rows, cols, kind, want_grad=True)
    g = g * scale
    grad_x, grad_w, grad_b = fixed_fanin_backward_reference(
        g.to(x.dtype), x, w, ids, need_x, True, b is not None
    )
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return total, (grad_x.float() if grad_x is not None else None), grad_w, grad_b
