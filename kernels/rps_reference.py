"""The plain-PyTorch twin of the RPS layer (:mod:`xmc.kernels.rps`): the CPU training path and the test
oracle.

Chunked over labels: a chunk's weights are gathered from the array doubled with its negation
(``[array, -array]``: the sign is part of the slot id, ``slot + m`` for a negative sign) and multiplied; the
array gradient is an ``index_add_`` of G = g^T x into the doubled buffer. The slot table comes from an
:class:`~xmc.kernels.rps_mapping.RPSTableCache` when one covers the rows, else it is hashed per chunk.
"""

from __future__ import annotations

import torch
from xmc.kernels._common import TRITON_DTYPES, accumulation_dtype
from xmc.kernels.rps_mapping import RPSMapping, RPSTableCache, check_inputs, rps_table

__all__ = ["REFERENCE_CHUNK_ELEMENTS", "rps_backward_reference", "rps_forward_reference", "rps_weight"]

# The reference materializes at most this many weights at a time (64 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 2**24


def _table(mapping, start, num_rows, cache, device) -> torch.Tensor:
    if cache is not None and cache.covers(mapping, start, start + num_rows, device):
        return cache.rows(start, start + num_rows)
    return rps_table(mapping, start, num_rows, device)


def _signed(array: torch.Tensor, mapping: RPSMapping, acc: torch.dtype) -> torch.Tensor:
    """The array indexed by signed slot ids: ``[array, -array]`` (2m,), or ``array`` when unsigned."""
    array = array.detach().to(acc)
    return torch.cat([array, -array]) if mapping.sign else array


def _row_chunks(num_rows: int, width: int):
    step = max(1, REFERENCE_CHUNK_ELEMENTS // width)
    for lo in range(0, num_rows, step):
        yield lo, min(num_rows, lo + step)


def _gather(signed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return signed.index_select(0, table.reshape(-1)).view(table.shape)


def rps_weight(
    array: torch.Tensor,
    mapping: RPSMapping,
    *,
    row_start: int,
    num_rows: int,
    scale: float,
    cache: RPSTableCache | None = None,
) -> torch.Tensor:
    """The materialized weight (num_rows, D) of global rows ``row_start ..``, array dtype, no grad."""
    table = _table(mapping, row_start, num_rows, cache, array.device)
    return _gather(_signed(array, mapping, array.dtype), table) * scale


def rps_forward_reference(
    x: torch.Tensor,
    array: torch.Tensor,
    bias: torch.Tensor | None,
    mapping: RPSMapping,
    *,
    row_start: int,
    num_rows: int,
    scale: float,
    cache: RPSTableCache | None = None,
) -> torch.Tensor:
    """Reference forward, same contract as :func:`rps_forward_triton` plus float64, on any device: per
    chunk of labels, gather the chunk's weights and multiply (``cache`` supplies the slot table when it
    covers the rows)."""
    check_inputs(x, array, bias, mapping, row_start, num_rows, (*TRITON_DTYPES, torch.float64))
    with torch.autocast(x.device.type, enabled=False):
        acc = accumulation_dtype(x.dtype, array.dtype)
        signed, xa = _signed(array, mapping, acc), x.to(acc)
        out = torch.empty((x.shape[0], num_rows), dtype=x.dtype, device=x.device)
        for lo, hi in _row_chunks(num_rows, mapping.in_features):
            w = _gather(signed, _table(mapping, row_start + lo, hi - lo, cache, x.device))  # (chunk, D)
            if bias is None:
                out[:, lo:hi] = torch.mm(xa, w.t()).mul_(scale)
            else:
                out[:, lo:hi] = torch.addmm(bias[lo:hi].to(acc), xa, w.t(), alpha=scale)
        return out


def rps_backward_reference(
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
    cache: RPSTableCache | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference backward, same contract as :func:`rps_backward_triton`: per chunk of labels, grad_x += g W
    and the chunk's G = g^T x is ``index_add_``-ed into the doubled (signed) array gradient."""
    B, num_rows = grad_out.shape
    check_inputs(x, array, None, mapping, row_start, num_rows, (*TRITON_DTYPES, torch.float64))
    if B != x.shape[0] or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be (B, n) on {x.device} with B = {x.shape[0]}, got "
            f"{tuple(grad_out.shape)} on {grad_out.device}"
        )
    with torch.autocast(x.device.type, enabled=False):
        acc = accumulation_dtype(x.dtype, array.dtype, grad_out.dtype)
        g, xa = grad_out.to(acc), x.to(acc)
        grad_x = torch.zeros((B, mapping.in_features), dtype=acc, device=x.device) if need_x else None
        signed = _signed(array, mapping, acc) if need_x else None
        buffer = torch.zeros(mapping.size * (2 if mapping.sign else 1), dtype=acc, device=x.device)
        for lo, hi in _row_chunks(num_rows, mapping.in_features) if need_x or need_array else ():
            table = _table(mapping, row_start + lo, hi - lo, cache, x.device)
            if need_x:
                grad_x.addmm_(g[:, lo:hi], _gather(signed, table))
            if need_array:
                buffer.index_add_(0, table.reshape(-1), (g[:, lo:hi].t() @ xa).view(-1))
        grad_array = None
        if need_array:
            grad_array = buffer[: mapping.size] - buffer[mapping.size :] if mapping.sign else buffer
            grad_array = (grad_array * grad_scale).to(array.dtype)
        return (
            grad_x.mul_(scale).to(x.dtype) if need_x else None,
            grad_array,
            g.sum(0).to(array.dtype) if need_bias else None,
        )
