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
block of columns and a block of batch rows and gathers every slot of its columns: no races, no atomics, the
same sum in the same order on every run. The transpose costs one stable sort of L * K ids and 4 bytes per
slot (int32 ``slots``; int64 once L * K >= 2**31); the caller keeps it and recomputes it only when the ids
change (after SET rewiring).

Memory traffic (s_x, s_w, s_g, s_o: bytes per element of x, weight, grad_out, out; s_i: bytes per id, 2 or 4;
s_s: bytes per CSC slot id, 4 or 8; Bb = ceil(B / BLOCK_B) batch blocks; Kb = ceil(K / BLOCK_K)):

    forward      weight + ids   Bb * L * K * (s_w + s_i)   (once per batch block)
                 x gathers      B * L * K * s_x            (served from L2: x itself is only B * D * s_x)
                 out            B * L * s_o                (written)
    input grad   slots          Bb * L * K * s_s  +  (D + 1) * 8
                 weight         Bb * L * K * s_w           (gathered in column order: scattered reads)
                 grad_out       B * L * K * s_g            (gathered, B values per slot)
                 grad_x         B * D * s_x                (written)
    weight grad  ids            L * K * s_i
                 x gathers      B * L * K * s_x            (L2)
                 grad_out       Kb * B * L * s_g
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

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is a Linux-only dependency: elsewhere only the reference backend exists.
    from types import SimpleNamespace

    triton = None
    tl = SimpleNamespace(constexpr=int)

    def _jit(fn):
        return fn

else:
    _jit = triton.jit

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
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int16, torch.int32)
BACKENDS = ("auto", "triton", "reference")

# Block sizes: fixed, sized so a program's largest gather tile is 4-8K elements (enough work per program on a
# GPU without spilling registers) and so the interpreter's tests need few programs. GPU tuning comes later.
_FWD_BLOCK_B, _FWD_BLOCK_L, _FWD_BLOCK_K = 16, 32, 16
_BWD_X_BLOCK_B, _BWD_X_BLOCK_D, _BWD_X_BLOCK_S = 16, 8, 32
_BWD_W_BLOCK_B, _BWD_W_BLOCK_L, _BWD_W_BLOCK_K = 16, 32, 16

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
    x_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    out_ptr,
    B,
    L,
    K,
    stride_xb,
    stride_xd,
    stride_wl,
    stride_wk,
    stride_il,
    stride_ik,
    stride_ob,
    stride_ol,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: out[b, l] for BLOCK_B batch rows x BLOCK_L labels, walking K in tiles of BLOCK_K."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,) int64
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,) int64
    mask_l = offs_l < L
    mask_b = offs_b < B

    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_lk = mask_l[:, None] & (offs_k[None, :] < K)  # (BLOCK_L, BLOCK_K)
        w = tl.load(
            w_ptr + offs_l[:, None] * stride_wl + offs_k[None, :] * stride_wk, mask=mask_lk, other=0.0
        )
        cols = tl.load(
            idx_ptr + offs_l[:, None] * stride_il + offs_k[None, :] * stride_ik, mask=mask_lk, other=0
        )
        cols = cols.to(tl.int32)
        # (BLOCK_B, BLOCK_L, BLOCK_K) gather of x; rows of x are short, so these hit L2.
        xv = tl.load(
            x_ptr + offs_b[:, None, None] * stride_xb + cols[None, :, :] * stride_xd,
            mask=mask_b[:, None, None] & mask_lk[None, :, :],
            other=0.0,
        )
        acc += tl.sum(xv.to(tl.float32) * w.to(tl.float32)[None, :, :], axis=2)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_offs = offs_b[:, None] * stride_ob + offs_l[None, :] * stride_ol
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_l[None, :])


@_jit
def _fixed_fanin_bwd_x_kernel(
    grad_out_ptr,
    w_ptr,
    col_ptr_ptr,
    slots_ptr,
    grad_x_ptr,
    B,
    D,
    K,
    stride_gb,
    stride_gl,
    stride_wl,
    stride_wk,
    stride_xb,
    stride_xd,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program: grad_x[b, d] for BLOCK_B batch rows x BLOCK_D columns, gathering BLOCK_S slots per
    column per step from the CSC transpose. Under random wiring the columns of a block hold about the same
    number of slots, so looping to the longest one wastes little."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_d = offs_d < D
    mask_b = offs_b < B

    start = tl.load(col_ptr_ptr + offs_d, mask=mask_d, other=0)  # (BLOCK_D,) int64
    end = tl.load(col_ptr_ptr + offs_d + 1, mask=mask_d, other=0)
    longest = tl.max(end - start, axis=0)

    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, longest, BLOCK_S):
        pos = start[:, None] + s0 + tl.arange(0, BLOCK_S)[None, :]  # (BLOCK_D, BLOCK_S) positions in slots
        mask_s = pos < end[:, None]
        slot = tl.load(slots_ptr + pos, mask=mask_s, other=0).to(tl.int64)
        row = slot // K
        w = tl.load(w_ptr + row * stride_wl + (slot - row * K) * stride_wk, mask=mask_s, other=0.0)
        g = tl.load(
            grad_out_ptr + offs_b[:, None, None] * stride_gb + row[None, :, :] * stride_gl,
            mask=mask_b[:, None, None] & mask_s[None, :, :],
            other=0.0,
        )  # (BLOCK_B, BLOCK_D, BLOCK_S)
        acc += tl.sum(g.to(tl.float32) * w.to(tl.float32)[None, :, :], axis=2)

    out_offs = offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd
    tl.store(
        grad_x_ptr + out_offs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_d[None, :]
    )


@_jit
def _fixed_fanin_bwd_w_kernel(
    grad_out_ptr,
    x_ptr,
    idx_ptr,
    grad_w_ptr,
    grad_b_ptr,
    B,
    L,
    K,
    stride_gb,
    stride_gl,
    stride_xb,
    stride_xd,
    stride_il,
    stride_ik,
    stride_wl,
    stride_wk,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: grad_w for BLOCK_L labels x BLOCK_K slots (and grad_b for those labels in the first
    slot block), looping over the whole batch in steps of BLOCK_B. Programs own disjoint outputs: no races."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_lk = mask_l[:, None] & (offs_k[None, :] < K)
    if NEED_W:
        cols = tl.load(
            idx_ptr + offs_l[:, None] * stride_il + offs_k[None, :] * stride_ik, mask=mask_lk, other=0
        )
        cols = cols.to(tl.int32)

    acc_w = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = tl.arange(0, BLOCK_B).to(tl.int64) + b0
        mask_b = offs_b < B
        g = tl.load(
            grad_out_ptr + offs_b[:, None] * stride_gb + offs_l[None, :] * stride_gl,
            mask=mask_b[:, None] & mask_l[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_B, BLOCK_L)
        if NEED_W:
            xv = tl.load(
                x_ptr + offs_b[:, None, None] * stride_xb + cols[None, :, :] * stride_xd,
                mask=mask_b[:, None, None] & mask_lk[None, :, :],
                other=0.0,
            )  # (BLOCK_B, BLOCK_L, BLOCK_K)
            acc_w += tl.sum(g[:, :, None] * xv.to(tl.float32), axis=0)
        if NEED_B:
            acc_b += tl.sum(g, axis=0)

    if NEED_W:
        w_offs = offs_l[:, None] * stride_wl + offs_k[None, :] * stride_wk
        tl.store(grad_w_ptr + w_offs, acc_w.to(grad_w_ptr.dtype.element_ty), mask=mask_lk)
    if NEED_B:
        if pid_k == 0:
            tl.store(grad_b_ptr + offs_l, acc_b.to(grad_b_ptr.dtype.element_ty), mask=mask_l)


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
) -> None:
    """Shapes, dtypes and devices shared by both backends; ``triton_path`` adds the Triton dtype limits."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or indices.shape != weight.shape:
        raise ValueError(
            f"weight and indices must both be (L, K), got {tuple(weight.shape)} and {tuple(indices.shape)}"
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
    col_ptr = torch.zeros(in_features + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=in_features), dim=0, out=col_ptr[1:])
    slots = torch.argsort(flat, stable=True)
    if flat.numel() < 2**31:
        slots = slots.to(torch.int32)
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
    block_b, block_k = _block(B, _FWD_BLOCK_B), _block(K, _FWD_BLOCK_K)
    grid = (triton.cdiv(L, _FWD_BLOCK_L), triton.cdiv(B, block_b))
    _fixed_fanin_fwd_kernel[grid](
        x,
        weight,
        indices,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        B,
        L,
        K,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        indices.stride(0),
        indices.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_B=block_b,
        BLOCK_L=_FWD_BLOCK_L,
        BLOCK_K=block_k,
    )
    return out


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
        if col_ptr.shape != (D + 1,) or col_ptr.dtype != torch.int64:
            raise ValueError(
                f"col_ptr must be int64 of shape ({D + 1},), got {col_ptr.dtype} {tuple(col_ptr.shape)}"
            )
        if slots.dim() != 1 or slots.numel() > L * K or slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"slots must be 1-D int32/int64 with at most L * K = {L * K} entries, "
                f"got {slots.dtype} {tuple(slots.shape)}"
            )
        if col_ptr.device != x.device or slots.device != x.device:
            raise ValueError(f"col_ptr and slots must be on {x.device}")
        col_ptr, slots = col_ptr.contiguous(), slots.contiguous()
        grad_x = _new_output((B, D), x.dtype, x.device)
        if grad_x.numel():
            block_b = _block(B, _BWD_X_BLOCK_B)
            grid = (triton.cdiv(D, _BWD_X_BLOCK_D), triton.cdiv(B, block_b))
            _fixed_fanin_bwd_x_kernel[grid](
                grad_out,
                weight,
                col_ptr,
                slots,
                grad_x,
                B,
                D,
                K,
                grad_out.stride(0),
                grad_out.stride(1),
                weight.stride(0),
                weight.stride(1),
                grad_x.stride(0),
                grad_x.stride(1),
                BLOCK_B=block_b,
                BLOCK_D=_BWD_X_BLOCK_D,
                BLOCK_S=_BWD_X_BLOCK_S,
            )

    if need_w:
        grad_w = _new_output((L, K), weight.dtype, weight.device)
    if need_b:
        grad_b = _new_output((L,), weight.dtype, weight.device)
    if (need_w and grad_w.numel()) or (need_b and grad_b.numel()):
        block_b, block_k = _block(B, _BWD_W_BLOCK_B), _block(K, _BWD_W_BLOCK_K)
        grid = (triton.cdiv(L, _BWD_W_BLOCK_L), max(1, triton.cdiv(K, block_k)) if need_w else 1)
        _fixed_fanin_bwd_w_kernel[grid](
            grad_out,
            x,
            indices,
            grad_w if need_w else weight,  # placeholders are never written
            grad_b if need_b else weight,
            B,
            L,
            K,
            grad_out.stride(0),
            grad_out.stride(1),
            x.stride(0),
            x.stride(1),
            indices.stride(0),
            indices.stride(1),
            weight.stride(0),  # grad_w is a fresh contiguous (L, K) tensor: same strides as weight
            weight.stride(1),
            NEED_W=need_w,
            NEED_B=need_b,
            BLOCK_B=block_b,
            BLOCK_L=_BWD_W_BLOCK_L,
            BLOCK_K=block_k,
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


def _use_triton(backend: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
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
    if _use_triton(backend, x, weight):
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
    if _use_triton(backend, x, weight):
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
