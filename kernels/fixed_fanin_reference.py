"""The plain-PyTorch twin of the fixed fan-in layer (:mod:`xmc.kernels.fixed_fanin`): the CPU path and the
test oracle.

Same contract as the Triton launchers plus float64 and int64 ids, on any device, chunked over labels so memory
stays bounded at millions of labels: a block of labels becomes a CSR matrix and the vendor sparse kernels
(MKL on CPU) do the products.
"""

from __future__ import annotations

import warnings

import torch
from xmc.kernels._common import TRITON_DTYPES, accumulation_dtype
from xmc.kernels.fanin_common import check_grad_out, check_layer, column_transpose

__all__ = [
    "REFERENCE_CHUNK_ELEMENTS",
    "SAMPLED_WIDTH_RATIO",
    "fixed_fanin_backward_reference",
    "fixed_fanin_forward_reference",
]

# The reference keeps each gathered ``x[:, idx[chunk]]`` tensor under this many elements.
REFERENCE_CHUNK_ELEMENTS = 2**24
# The reference weight gradient computes the dense (chunk, D) product g^T x and samples it at the ids while
# D < SAMPLED_WIDTH_RATIO * K; wider inputs (e.g. raw TF-IDF features, D = 20,000 with K = 64) score only
# the L * K slots with a sampled sparse product: 0.11 s against ~68 GFLOP dense at that shape on 2 cores.
SAMPLED_WIDTH_RATIO = 16


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
    check_layer(x, weight, indices, bias, triton_path=False)
    with torch.autocast(x.device.type, enabled=False):  # the products must run in the accumulation dtype
        return _forward_reference(x, weight, indices, bias)


def _forward_reference(x, weight, indices, bias):
    B, L, K = x.shape[0], weight.shape[0], weight.shape[1]
    acc = accumulation_dtype(x.dtype, weight.dtype)
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
    check_layer(x, weight, indices, None, triton_path=False)
    check_grad_out(grad_out, x, weight, (*TRITON_DTYPES, torch.float64))
    with torch.autocast(x.device.type, enabled=False):
        return _backward_reference(grad_out, x, weight, indices, need_x, need_w, need_b, transpose)


def _backward_reference(grad_out, x, weight, indices, need_x, need_w, need_b, transpose):
    B, D = x.shape
    L, K = weight.shape
    acc = accumulation_dtype(x.dtype, weight.dtype, grad_out.dtype)
    g = grad_out.to(acc)
    xa = x.to(acc)
    grad_x = torch.zeros((D, B), dtype=acc, device=x.device) if need_x else None
    grad_w = torch.empty((L, K), dtype=weight.dtype, device=weight.device) if need_w else None
    use_sampled = D >= SAMPLED_WIDTH_RATIO * K
    # Only the dense weight-gradient product holds (chunk, D) values; the sparse products hold slots.
    step = _slot_chunk(K, 1 if use_sampled else D)
    whole = transpose if step >= L else None
    for lo in range(0, L, step if (need_x or need_w) else L):
        hi = min(L, lo + step)
        if need_x:
            grad_x += _columns_csr(weight[lo:hi], indices[lo:hi], D, acc, whole) @ g[:, lo:hi].t()
        if need_w:
            ids = indices[lo:hi].long()
            if use_sampled:  # few slots per row: score only the slots (SDDMM)
                pattern = _csr(
                    torch.arange(0, (hi - lo) * K + 1, K, device=x.device),
                    ids.reshape(-1),
                    torch.zeros((hi - lo) * K, dtype=acc, device=x.device),
                    (hi - lo, D),
                )
                slots = torch.sparse.sampled_addmm(pattern, g[:, lo:hi].t().contiguous(), xa, beta=0.0)
                grad_w[lo:hi] = slots.values().view(hi - lo, K).to(weight.dtype)
            else:
                dense = g[:, lo:hi].t() @ xa  # (chunk, D)
                grad_w[lo:hi] = dense.gather(1, ids).to(weight.dtype)
    grad_b = g.sum(dim=0).to(weight.dtype) if need_b else None
    return (grad_x.t().to(x.dtype) if need_x else None), grad_w, grad_b
