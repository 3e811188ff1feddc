"""Randomized parameter sharing (RPS): an L x D classifier weight read from one shared array of m slots.

    W[l, d] = scale * sign(l, d) * array[slot(l, d)]        l: global label id, d: input column

``(slot, sign)`` is a pure function of (l, d, seed) and the layer's shape, recomputed wherever a weight is
needed: the L x D weight never exists. ``l`` is the global label id (a label shard's row 0 is its
``row_start``), so every shard maps its rows exactly as the whole layer does. Three mappings:

- ``hashednet``: slot = h(seed, l, d) mod m, one hash per weight.
- ``roast``: W is cut into (TL, TD) tiles; tile (l // TL, d // TD) starts at offset h(seed, tile row,
  tile col) mod m and its element (i, j) reads slot (offset + i * TD + j) mod m: a contiguous run of the
  array, wrapping.
- ``stable`` (STABLE-RPS): the weights are laid out in one virtual array in tile-major order, v(l, d), each
  (TL, TD) tile contiguous and the partial edge tiles packed, so v is a bijection onto [0, L * D) (L is the
  whole layer's label count). The virtual array is folded into pieces of m: piece p = v // m, slot =
  (v mod m + h(seed, p)) mod m. At compression 1 (m = L * D) the map is a bijection (the dense model is
  recoverable) and with m dividing L * D every slot holds exactly L * D / m weights.

Signs (optional, on by default) are bit d mod 32 of an independent hash h'(seed, l, d // 32), so one hash
gives 32 signs. The hash is the avalanche ``mix32`` of :mod:`xmc.kernels.hashing` folded over 32-bit keys,
``fold(s, k) = mix32((s ^ k) + 0x9E3779B9 mod 2**32)``, h(seed, a, b) = fold(fold(S, a), b) with the seed
state S = ``hash_keys(seed, salt)`` (one salt per use); keys are taken mod 2**32 (labels, columns and pieces
stay below that). Torch computes it in int64, Triton in uint32 (which wraps mod 2**32): the same bits; both
live in :mod:`xmc.kernels.rps_mapping`.

Gradients, for a logit gradient g (B, n) of rows ``row_start .. row_start + n - 1`` and input x (B, D):

    out[b, l]       = scale * sum_d x[b, d] sign(l, d) array[slot(l, d)]   (+ bias[l])
    grad_x[b, d]    = scale * sum_l g[b, l] sign(l, d) array[slot(l, d)]
    grad_array[j]   = grad_scale * sum over (l, d) with slot(l, d) = j of sign(l, d) G[l, d],   G = g^T x
    grad_bias[l]    = sum_b g[b, l]

``grad_scale = scale`` gives the true gradient of the array. Why STABLE-RPS divides it by scale**2 (the mean
of the squared scale factors of the weights sharing a slot; every weight of a layer has the same ``scale``),
i.e. passes ``grad_scale = 1 / scale``: the true gradient is grad_array[j] = scale * sum_{i -> j} sign_i g_i,
so an SGD step moves each weight by scale * lr * grad_array = lr * scale**2 * sum sign g. The step in weight
space therefore scales with scale**2 = (init_scale / array_std)**2: the same weights initialized through an
array of another scale train with another effective learning rate, and a learning rate tuned for one array
initialization is wrong for another. Divided by scale**2 the step is lr * sum sign g, independent of the
scale factor. The mean of the squares (rather than, say, of the factors) is what cancels exactly: each
weight's contribution to a slot's gradient carries its factor once, and its step carries it again. HashedNet
and ROAST use the undivided ("unscaled") gradient.

Memory traffic of the Triton kernels per step (s_x, s_a: bytes per element of x and array): the forward and
the input gradient read x (or g) once per label block and n * D array values per batch block (gathers from
an m-slot array much smaller than the weight, so mostly L2 hits), and write B * n logits or B * D values; the
array gradient reads g and x once per (label, column) block and issues n * D fp32 atomic adds. The hashing is
integer arithmetic in registers (two to four ``mix32`` rounds per weight), recomputed by every kernel.

Why the array gradient uses atomics: a slot's weights come from anywhere in the L x D weight (HashedNet) or
from several tiles (ROAST, STABLE), so an owner-computes formulation needs the inverse map, 4-8 bytes per
weight: the memory RPS exists to save. Contention is low (m addresses, about L * D / m adds each, unlike the D
addresses of a dense input gradient), so fp32 ``atomic_add`` into an m-slot fp32 buffer is cheap; the price
is that the summation order, hence the last bits of the array gradient, varies from run to run on a GPU. The
input gradient needs no atomics (split over label blocks into fp32 partial sums, reduced afterwards).

Every kernel has a plain-PyTorch twin (``rps_forward_reference`` / ``rps_backward_reference`` in
:mod:`xmc.kernels.rps_reference`), chunked over labels; it is the CPU training path and the test oracle. It
gathers a label chunk's weights from the array doubled with its negation (``[array, -array]``: the sign is
part of the slot id, ``slot + m`` for a negative sign) and multiplies; the array gradient is an ``index_add_``
of G into the doubled buffer. Hashing every weight every step costs more on a CPU than the step itself, so the
reference can read the slot table from an ``RPSTableCache`` (:mod:`xmc.kernels.rps_mapping`): int32 ids of a
row range (4 bytes per weight, 54 MB at L = 52,946, D = 256), a speed cache for CPU training that is not model
state and not counted in the planner's memory rows.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from xmc.kernels._common import TRITON_DTYPES, block, new_output, require_triton, tl, triton, use_triton
from xmc.kernels._common import jit as _jit
from xmc.kernels.rps_mapping import SEED_ARGS, RPSMapping, RPSTableCache, check_inputs, map_args, rps_map_tl
from xmc.kernels.rps_reference import rps_backward_reference, rps_forward_reference

__all__ = [
    "RPSFunction",
    "rps_backward",
    "rps_backward_triton",
    "rps_forward",
    "rps_forward_triton",
    "rps_linear",
]

# Fixed block sizes (GPU tuning comes later); tl.dot needs every block dimension >= 16.
_FWD_BLOCK_L, _FWD_BLOCK_D, _MAX_BLOCK_B = 64, 32, 64
_BWD_X_BLOCK_L, _BWD_X_BLOCK_D, _BWD_X_MAX_SPLITS = 32, 64, 32
_BWD_A_BLOCK_L, _BWD_A_BLOCK_D = 64, 32


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@_jit(do_not_specialize=SEED_ARGS)
def _rps_fwd_kernel(
    x_ptr,
    array_ptr,
    bias_ptr,
    out_ptr,
    B,
    N,
    D,
    L,
    M,
    row_start,
    seed_slot,
    seed_sign,
    scale,
    stride_xb,
    stride_xd,
    stride_ob,
    stride_ol,
    METHOD: tl.constexpr,
    SIGN: tl.constexpr,
    TILE_L: tl.constexpr,
    TILE_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: out[b, l] for BLOCK_B batch rows x BLOCK_L labels; walks D, building each
    (BLOCK_L, BLOCK_D) weight tile from the mapping and the array."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_l = offs_l < N
    mask_b = offs_b < B
    rows = (row_start + offs_l)[:, None]
    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        slot, sign = rps_map_tl(
            rows, offs_d[None, :], L, D, M, seed_slot, seed_sign, METHOD, SIGN, TILE_L, TILE_D
        )
        w = tl.load(array_ptr + slot, mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * sign
        xv = tl.load(
            x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd,
            mask=mask_b[:, None] & mask_d[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc = tl.dot(xv.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_b[:, None] * stride_ob + offs_l[None, :] * stride_ol
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_l[None, :])


@_jit(do_not_specialize=SEED_ARGS)
def _rps_bwd_x_kernel(
    g_ptr,
    array_ptr,
    partial_ptr,
    B,
    N,
    D,
    L,
    M,
    row_start,
    seed_slot,
    seed_sign,
    scale,
    stride_gb,
    stride_gl,
    METHOD: tl.constexpr,
    SIGN: tl.constexpr,
    TILE_L: tl.constexpr,
    TILE_D: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: this split's share of grad_x for BLOCK_B batch rows x BLOCK_D columns, summing the label
    blocks pid_s, pid_s + S, ... into partial[pid_s] (S, B, D) fp32; the caller sums over S. No atomics."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_d = offs_d < D
    mask_b = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for l0 in range(pid_s * BLOCK_L, N, num_splits * BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        mask_l = offs_l < N
        rows = (row_start + offs_l)[:, None]
        slot, sign = rps_map_tl(
            rows, offs_d[None, :], L, D, M, seed_slot, seed_sign, METHOD, SIGN, TILE_L, TILE_D
        )
        w = tl.load(array_ptr + slot, mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * sign
        g = tl.load(
            g_ptr + offs_b[:, None] * stride_gb + offs_l[None, :] * stride_gl,
            mask=mask_b[:, None] & mask_l[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc = tl.dot(g.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w.to(g.dtype), acc)
    offs = (pid_s * B + offs_b[:, None]) * D + offs_d[None, :]
    tl.store(partial_ptr + offs, acc * scale, mask=mask_b[:, None] & mask_d[None, :])


@_jit(do_not_specialize=SEED_ARGS)
def _rps_bwd_array_kernel(
    g_ptr,
    x_ptr,
    grad_array_ptr,
    grad_bias_ptr,
    B,
    N,
    D,
    L,
    M,
    row_start,
    seed_slot,
    seed_sign,
    grad_scale,
    stride_gb,
    stride_gl,
    stride_xb,
    stride_xd,
    METHOD: tl.constexpr,
    SIGN: tl.constexpr,
    TILE_L: tl.constexpr,
    TILE_D: tl.constexpr,
    NEED_ARRAY: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: G = g^T x for BLOCK_L labels x BLOCK_D columns (looping over the batch), added signed and
    scaled into the slots with fp32 atomics; grad_bias of those labels in the first column block."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < N
    mask_d = offs_d < D
    acc_w = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = offs_b < B
        g = tl.load(
            g_ptr + offs_b[:, None] * stride_gb + offs_l[None, :] * stride_gl,
            mask=mask_b[:, None] & mask_l[None, :],
            other=0.0,
        )  # (BLOCK_B, BLOCK_L)
        if NEED_ARRAY:
            xv = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd,
                mask=mask_b[:, None] & mask_d[None, :],
                other=0.0,
            )
            if FP32_DOT:
                acc_w = tl.dot(tl.trans(g.to(tl.float32)), xv.to(tl.float32), acc_w, input_precision="ieee")
            else:
                acc_w = tl.dot(tl.trans(g), xv.to(g.dtype), acc_w)
        if NEED_BIAS:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
    if NEED_ARRAY:
        rows = (row_start + offs_l)[:, None]
        slot, sign = rps_map_tl(
            rows, offs_d[None, :], L, D, M, seed_slot, seed_sign, METHOD, SIGN, TILE_L, TILE_D
        )
        tl.atomic_add(
            grad_array_ptr + slot,
            acc_w * sign * grad_scale,
            mask=mask_l[:, None] & mask_d[None, :],
            sem="relaxed",
        )
    if NEED_BIAS:
        if pid_d == 0:
            tl.store(grad_bias_ptr + offs_l, acc_b.to(grad_bias_ptr.dtype.element_ty), mask=mask_l)


# Triton launchers
# ----------------------------------------------------------------------------------------------------------


def _block_b(batch: int) -> int:
    return max(16, block(batch, _MAX_BLOCK_B))


def rps_forward_triton(
    x: torch.Tensor,
    array: torch.Tensor,
    bias: torch.Tensor | None,
    mapping: RPSMapping,
    *,
    row_start: int,
    num_rows: int,
    scale: float,
) -> torch.Tensor:
    """Triton forward: x (B, D), array (m,), bias (num_rows,) or None -> logits (B, num_rows) in x's dtype,
    for global rows ``row_start ..``; floats bf16 / fp16 / fp32, fp32 accumulation (IEEE fp32 dots for fp32
    x)."""
    require_triton()
    check_inputs(x, array, bias, mapping, row_start, num_rows, TRITON_DTYPES)
    array = array.contiguous()
    B = x.shape[0]
    out = new_output((B, num_rows), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_b = _block_b(B)
    grid = (triton.cdiv(num_rows, _FWD_BLOCK_L), triton.cdiv(B, block_b))
    _rps_fwd_kernel[grid](
        x, array, bias.contiguous() if bias is not None else array, out,
        B, num_rows, mapping.in_features, mapping.num_labels, mapping.size, row_start, *mapping.seed_states,
        float(scale), x.stride(0), x.stride(1), out.stride(0), out.stride(1), **map_args(mapping),
        HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32,
        BLOCK_B=block_b, BLOCK_L=_FWD_BLOCK_L, BLOCK_D=_FWD_BLOCK_D,
    )  # fmt: skip
    return out


def rps_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    array: torch.Tensor,
    mapping: RPSMapping,
    *,
    row_start: int,
    scale: float,
    grad_scale: float,
    need_x: bool = True,
    need_array: bool = True,
    need_bias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: grad_out (B, n) of global rows ``row_start ..`` -> (grad_x (B, D) in x's dtype,
    grad_array (m,) and grad_bias (n,) in the array's dtype), None where not needed. See the module docstring
    for ``grad_scale``."""
    require_triton()
    B, num_rows = grad_out.shape
    check_inputs(x, array, None, mapping, row_start, num_rows, TRITON_DTYPES)
    if grad_out.shape[0] != x.shape[0] or grad_out.dtype not in TRITON_DTYPES or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be a float (B, n) tensor on {x.device} with B = {x.shape[0]}, got "
            f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}"
        )
    D = mapping.in_features
    args = (num_rows, D, mapping.num_labels, mapping.size, row_start, *mapping.seed_states)
    block_b = _block_b(B)
    grad_out = grad_out.to(x.dtype)  # the dots take both operands in x's dtype (IEEE fp32 or tensor cores)
    fp32_dot = x.dtype == torch.float32
    grad_x = grad_array = grad_bias = None
    if need_x:
        splits = max(1, min(_BWD_X_MAX_SPLITS, triton.cdiv(num_rows, _BWD_X_BLOCK_L)))
        partial = torch.zeros((splits, B, D), dtype=torch.float32, device=x.device)
        if partial.numel():
            grid = (triton.cdiv(D, _BWD_X_BLOCK_D), triton.cdiv(B, block_b), splits)
            _rps_bwd_x_kernel[grid](
                grad_out, array.contiguous(), partial, B, *args, float(scale),
                grad_out.stride(0), grad_out.stride(1), **map_args(mapping), FP32_DOT=fp32_dot,
                BLOCK_B=block_b, BLOCK_L=_BWD_X_BLOCK_L, BLOCK_D=_BWD_X_BLOCK_D,
            )  # fmt: skip
        grad_x = partial.sum(0).to(x.dtype)
    if need_array or need_bias:
        buffer = torch.zeros(mapping.size if need_array else 1, dtype=torch.float32, device=x.device)
        grad_bias = new_output((num_rows,), array.dtype, x.device) if need_bias else buffer
        if num_rows and B:
            grid = (
                triton.cdiv(num_rows, _BWD_A_BLOCK_L),
                triton.cdiv(D, _BWD_A_BLOCK_D) if need_array else 1,
            )
            _rps_bwd_array_kernel[grid](
                grad_out, x, buffer, grad_bias, B, *args, float(grad_scale),
                grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), **map_args(mapping),
                NEED_ARRAY=need_array, NEED_BIAS=need_bias, FP32_DOT=fp32_dot,
                BLOCK_B=block_b, BLOCK_L=_BWD_A_BLOCK_L, BLOCK_D=_BWD_A_BLOCK_D,
            )  # fmt: skip
        elif need_bias:
            grad_bias.zero_()
        grad_array = buffer.to(array.dtype) if need_array else None
        grad_bias = grad_bias if need_bias else None
    return grad_x, grad_array, grad_bias


# Dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


def rps_forward(x, array, bias, mapping, *, row_start, num_rows, scale, backend="auto", cache=None):
    """logits (B, num_rows); ``backend`` is ``auto``, ``triton`` or ``reference`` (``cache``: see
    :class:`RPSTableCache`, used by the reference only)."""
    kwargs = dict(row_start=row_start, num_rows=num_rows, scale=scale)
    if use_triton(backend, x, array):
        return rps_forward_triton(x, array, bias, mapping, **kwargs)
    return rps_forward_reference(x, array, bias, mapping, **kwargs, cache=cache)


def rps_backward(grad_out, x, array, mapping, *, row_start, scale, grad_scale, need_x=True, need_array=True,
                 need_bias=True, backend="auto", cache=None):  # fmt: skip
    """(grad_x, grad_array, grad_bias), None where not needed."""
    kwargs = dict(row_start=row_start, scale=scale, grad_scale=grad_scale, need_x=need_x,
                  need_array=need_array, need_bias=need_bias)  # fmt: skip
    if use_triton(backend, x, array):
        return rps_backward_triton(grad_out, x, array, mapping, **kwargs)
    return rps_backward_reference(grad_out, x, array, mapping, **kwargs, cache=cache)


class RPSFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, array, bias, mapping, row_start, num_rows, scale, grad_scale, backend,
    cache)`` -> logits (B, num_rows). The array's gradient is the one of the module docstring with
    ``grad_scale`` (the true gradient only when ``grad_scale == scale``)."""

    @staticmethod
    def forward(ctx, x, array, bias, mapping, row_start, num_rows, scale, grad_scale, backend, cache):
        ctx.save_for_backward(x, array)
        ctx.args = (mapping, row_start, scale, grad_scale, backend, cache)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return rps_forward(x, array, bias, mapping, row_start=row_start, num_rows=num_rows, scale=scale,
                           backend=backend, cache=cache)  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, array = ctx.saved_tensors
        mapping, row_start, scale, grad_scale, backend, cache = ctx.args
        need_x, need_array, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_array = grad_bias = None
        if need_x or need_array or need_bias:
            grad_x, grad_array, grad_bias = rps_backward(
                grad_out, x, array, mapping, row_start=row_start, scale=scale, grad_scale=grad_scale,
                need_x=need_x, need_array=need_array, need_bias=need_bias, backend=backend, cache=cache,
            )  # fmt: skip
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_x, grad_array, grad_bias, None, None, None, None, None, None, None


def rps_linear(
    x: torch.Tensor,
    array: torch.Tensor,
    bias: torch.Tensor | None,
    mapping: RPSMapping,
    *,
    row_start: int = 0,
    num_rows: int | None = None,
    scale: float = 1.0,
    grad_scale: float | None = None,
    backend: str = "auto",
    cache: RPSTableCache | None = None,
) -> torch.Tensor:
    """Differentiable RPS layer: x (B, D) -> logits (B, num_rows) of global rows ``row_start ..`` (default:
    all rows from ``row_start``). ``grad_scale`` defaults to ``scale`` (the true gradient)."""
    num_rows = mapping.num_labels - row_start if num_rows is None else num_rows
    grad_scale = scale if grad_scale is None else grad_scale
    return RPSFunction.apply(x, array, bias, mapping, row_start, num_rows, scale, grad_scale, backend, cache)
