"""The plain-PyTorch twin of the grouped fan-in layer (:mod:`xmc.kernels.grouped_fanin`): the CPU path and the
test oracle.

Same contract as the Triton launchers plus float64 and int64 ids, on any device. A range of groups at a time
runs as batched matrix products: the gathered inputs X_g (groups, B, K) times W_g^T for the logits, and
p = W_g^T @ grad_out_g^T scattered into grad_x's columns and grad_W_g = grad_out_g^T @ X_g for the gradients.
"""

from __future__ import annotations

import torch
from xmc.kernels._common import TRITON_DTYPES, accumulation_dtype
from xmc.kernels.fanin_common import check_grad_out, check_layer
from xmc.kernels.fixed_fanin_reference import REFERENCE_CHUNK_ELEMENTS

__all__ = ["grouped_fanin_backward_reference", "grouped_fanin_forward_reference"]


def _group_chunk(B: int, K: int, G: int) -> int:
    """Groups per reference chunk: the gathered (B, groups, K) inputs and the (B, groups * G) products stay
    under REFERENCE_CHUNK_ELEMENTS."""
    return max(1, REFERENCE_CHUNK_ELEMENTS // max(1, B * max(K, G)))


def _padded_rows(t: torch.Tensor, lo: int, hi: int, group: int) -> torch.Tensor:
    """Labels ``lo*G .. hi*G - 1`` of an (L, ...) tensor, the missing tail of the last group as zeros."""
    rows = t[lo * group : hi * group]
    missing = (hi - lo) * group - rows.shape[0]
    if missing:
        rows = torch.cat([rows, rows.new_zeros((missing, *rows.shape[1:]))])
    return rows


def grouped_fanin_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference forward, the Triton contract plus float64 and int64 ids, on any device: per range of
    groups, gather X_g (groups, B, K) and multiply by W_g^T (groups, K, G) in one batched product."""
    check_layer(x, weight, indices, bias, triton_path=False, group=group)
    with torch.autocast(x.device.type, enabled=False):
        B, (L, K) = x.shape[0], weight.shape
        acc = accumulation_dtype(x.dtype, weight.dtype)
        xt = x.to(acc).t()  # (D, B)
        out = torch.empty((B, L), dtype=x.dtype, device=x.device)
        n, step = indices.shape[0], _group_chunk(B, K, group)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            gathered = xt[indices[lo:hi].long()]  # (groups, K, B)
            w = _padded_rows(weight, lo, hi, group).to(acc).view(hi - lo, group, K)
            part = torch.bmm(w, gathered).reshape((hi - lo) * group, B).t()  # (B, groups * G)
            stop = min(L, hi * group)
            part = part[:, : stop - lo * group]
            if bias is not None:
                part = part + bias[lo * group : stop].to(acc)
            out[:, lo * group : stop] = part
        return out


def grouped_fanin_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    group: int,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference backward, the contract of ``grouped_fanin_backward_triton``: per range of groups,
    p = W_g^T @ grad_out_g^T is scattered into grad_x's columns (``index_add_``) and grad_W_g =
    grad_out_g^T @ X_g, both batched products."""
    check_layer(x, weight, indices, None, triton_path=False, group=group)
    check_grad_out(grad_out, x, weight, (*TRITON_DTYPES, torch.float64))
    with torch.autocast(x.device.type, enabled=False):
        B, D = x.shape
        L, K = weight.shape
        acc = accumulation_dtype(x.dtype, weight.dtype, grad_out.dtype)
        g, xt = grad_out.to(acc), x.to(acc).t()  # (B, L), (D, B)
        grad_x = torch.zeros((D, B), dtype=acc, device=x.device) if need_x else None
        grad_w = torch.empty((L, K), dtype=weight.dtype, device=weight.device) if need_w else None
        n, step = indices.shape[0], _group_chunk(B, K, group)
        for lo in range(0, n if (need_x or need_w) else 0, step):
            hi = min(n, lo + step)
            ids = indices[lo:hi].long()  # (groups, K)
            g_t = _padded_rows(g.t(), lo, hi, group).view(hi - lo, group, B)  # (groups, G, B)
            if need_x:
                w = _padded_rows(weight, lo, hi, group).to(acc).view(hi - lo, group, K)
                p = torch.bmm(w.transpose(1, 2), g_t)  # (groups, K, B)
                grad_x.index_add_(0, ids.reshape(-1), p.reshape(-1, B))
            if need_w:
                part = torch.bmm(g_t, xt[ids].transpose(1, 2))  # (groups, G, K)
                stop = min(L, hi * group)
                grad_w[lo * group : stop] = part.reshape(-1, K)[: stop - lo * group].to(weight.dtype)
        grad_b = g.sum(dim=0).to(weight.dtype) if need_b else None
        return (grad_x.t().to(x.dtype) if need_x else None), grad_w, grad_b
