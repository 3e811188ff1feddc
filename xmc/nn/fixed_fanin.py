"""``FixedFanInLinear``: a linear layer whose every output keeps exactly K input connections."""

from __future__ import annotations

import math

import torch
from torch import nn

from xmc.kernels.fanin_common import column_transpose
from xmc.kernels.fixed_fanin import fixed_fanin
from xmc.kernels.grouped_fanin import grouped_fanin, num_groups
from xmc.kernels.hashing import uniform
from xmc.sparse.ids import INIT_BIAS, INIT_IDS, INIT_WEIGHT, fill_distinct

_INIT_CHUNK_ROWS = 1 << 16  # rows initialized at a time: bounds the (rows, K) int64 hash temporaries


def index_dtype(in_features: int) -> torch.dtype:
    """int16 ids while they fit (half the memory traffic of int32), else int32."""
    return torch.int16 if in_features <= 32767 else torch.int32


class FixedFanInLinear(nn.Module):
    """``y = x W^T + b`` where row ``l`` of W has exactly ``fan_in`` nonzeros.

    Parameters: ``weight`` (L, K) values; buffer ``indices`` (L, K) column ids (int16 when
    ``in_features <= 32767``, else int32), distinct within each row; ``bias`` (L,). Forward runs the
    Triton kernels on CUDA and the chunked PyTorch reference elsewhere (float64 included).

    Grouped fan-in (``group`` G > 1, HASTE's layout): outputs in consecutive groups of G share one id
    row, so ``indices`` is (ceil(L / G), K) while ``weight`` stays (L, K); a group's outputs are a small
    dense product on tensor cores (:mod:`xmc.kernels.grouped_fanin`). G = 1 is the plain layer.

    Initialization draws ids and weights from hashes of ``(seed, global row)``, where the global row
    of local row ``i`` is ``row_offset + i`` (for ids, the global group ``row_offset / G + i``): a label
    shard built with its offset equals the same rows of the whole layer. Weights and bias are uniform
    in ``±1/sqrt(K)`` (``nn.Linear``'s scale for a fan-in of K).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        seed: int = 0,
        row_offset: int = 0,
        group: int = 1,
    ) -> None:
        super().__init__()
        if group < 1 or row_offset % group:
            raise ValueError(f"group must be >= 1 and divide row_offset ({row_offset}), got {group}")
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in 1..in_features ({in_features}), got {fan_in}")
        if out_features < 1:
            raise ValueError(f"out_features must be positive, got {out_features}")
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        self.seed, self.row_offset, self.group = seed, row_offset, group
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, fan_in, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer(
            "indices",
            torch.empty(
                num_groups(out_features, group), fan_in, dtype=index_dtype(in_features), device=device
            ),
        )
        self._transpose: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.fan_in)
        device = self.weight.device
        slots = torch.arange(self.fan_in, device=device)
        for start in range(0, self.indices.shape[0], _INIT_CHUNK_ROWS):
            stop = min(start + _INIT_CHUNK_ROWS, self.indices.shape[0])
            empty = torch.zeros(stop - start, self.fan_in, dtype=torch.int64, device=device)
            ids = fill_distinct(
                empty,
                torch.ones_like(empty, dtype=torch.bool),
                # Global id rows (not global_rows: a subclass may key regrowth differently).
                torch.arange(start, stop, device=device) + self.row_offset // self.group,
                self.in_features,
                (self.seed, INIT_IDS),
            )
            self.indices[start:stop] = ids.to(self.indices.dtype)
        for start in range(0, self.out_features, _INIT_CHUNK_ROWS):
            stop = min(start + _INIT_CHUNK_ROWS, self.out_features)
            rows = torch.arange(start, stop, device=device) + self.row_offset
            values = uniform(self.seed, INIT_WEIGHT, rows[:, None], slots[None, :]) * 2 - 1
            self.weight[start:stop] = (values * bound).to(self.weight.dtype)
            if self.bias is not None:
                self.bias[start:stop] = ((uniform(self.seed, INIT_BIAS, rows) * 2 - 1) * bound).to(
                    self.bias.dtype
                )

    def global_rows(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start,) int64 global numbers of local id rows ``start..stop-1`` (labels, or groups when
        G > 1): the hash keys of their ids at initialization and regrowth."""
        return torch.arange(start, stop, device=self.weight.device) + self.row_offset // self.group

    def label_ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop - start, K) column ids of outputs ``start..stop-1`` (a group's id row repeated per label)."""
        stop = self.out_features if stop is None else stop
        if self.group == 1:
            return self.indices[start:stop]
        rows = torch.arange(start, stop, device=self.indices.device) // self.group
        return self.indices[rows]

    def column_transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CSC view of the id rows (``col_ptr`` (D+1,), ``slots`` (rows*K,)) used by the input-gradient
        kernel; cached until ``indices`` changes (in-place edits bump its version counter)."""
        key = (self.indices.data_ptr(), self.indices._version)
        if self._transpose is None or self._transpose[0] != key:
            self._transpose = (key, column_transpose(self.indices, self.in_features))
        return self._transpose[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, L)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs of width {self.in_features}, got shape {tuple(x.shape)}")
        if self.group > 1:
            return grouped_fanin(
                x, self.weight, self.indices, self.group, self.bias, transpose=self.column_transpose()
            )
        return fixed_fanin(x, self.weight, self.indices, self.bias, transpose=self.column_transpose())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"bias={self.bias is not None}, ids={str(self.indices.dtype).removeprefix('torch.')}, "
            f"seed={self.seed}, row_offset={self.row_offset}"
            + (f", group={self.group}" if self.group > 1 else "")
        )

    def to_dense(self) -> torch.Tensor:
        """The (L, D) weight with zeros off the pattern."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device
        )
        return dense.scatter_(1, self.label_ids().long(), self.weight.detach())

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, fan_in: int, bias: torch.Tensor | None = None, **kwargs
    ) -> FixedFanInLinear:
        """Keep the ``fan_in`` largest-magnitude entries of each row of a dense (L, D) ``weight``
        (ties to the lower column; with ``group=G`` in ``kwargs``, the columns of largest summed
        magnitude over each group's rows); ids are stored in increasing order."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            fan_in,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            # Stable descending sort on |w| keeps the lower column first among equal magnitudes.
            magnitude = weight.abs()
            if layer.group > 1:  # sum each group's rows (the last group padded with zeros)
                pad = layer.indices.shape[0] * layer.group - out_features
                magnitude = torch.nn.functional.pad(magnitude, (0, 0, 0, pad))
                magnitude = magnitude.view(-1, layer.group, in_features).sum(1)
            keep = torch.sort(magnitude, dim=1, descending=True, stable=True).indices[:, :fan_in]
            layer.indices.copy_(torch.sort(keep, dim=1).values.to(layer.indices.dtype))
            layer.weight.copy_(torch.gather(weight, 1, layer.label_ids().long()))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer
