"""The fixed fan-in classifier: every label keeps exactly K connections into the D inputs.

With ``group`` G > 1 (``classifier.fan_in_group``, HASTE's grouped fan-in), labels in consecutive groups of
G share one id row: ids take G times fewer bytes and a group's logits are a small dense product on tensor
cores (:mod:`xmc.kernels.grouped_fanin`). Label chunks then start on group boundaries."""

from __future__ import annotations

import logging

import torch
from torch import nn

from xmc.classifiers.base import Classifier
from xmc.classifiers.chunked import shard_range
from xmc.kernels.fixed_fanin import (
    fixed_fanin,
    fixed_fanin_backward,
    fixed_fanin_input_gradient_triton,
    use_triton,
)
from xmc.kernels.fixed_fanin_loss import fixed_fanin_loss_triton
from xmc.kernels.grouped_fanin import (
    GROUP_BUFFER_BYTES,
    grouped_fanin,
    grouped_fanin_backward,
    grouped_fanin_input_gradient_triton,
    num_groups,
)
from xmc.memory.bytes import chunk_gradient_bytes, logits_bytes, optimizer_state_bytes
from xmc.nn.fixed_fanin import FixedFanInLinear, index_dtype

log = logging.getLogger(__name__)

# Whether the fused-loss kernel may be launched: cleared, with a warning, the first time Triton cannot build
# it (a compiler error, or a kernel too large for the GPU's resources), so training goes on unfused.
_FUSED_KERNEL = {"usable": True}
try:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    _KERNEL_BUILD_ERRORS: tuple[type[Exception], ...] = (CompilationError, OutOfResources)
except ImportError:  # no Triton: the kernel is never launched
    _KERNEL_BUILD_ERRORS = ()


class FixedFanInClassifier(Classifier):
    """A :class:`~xmc.nn.FixedFanInLinear` over all labels behind the classifier interface.

    ``layer`` holds ``weight`` (L, K), ``indices`` (L, K), or (ceil(L / G), K) with ``group`` G > 1, and
    ``bias`` (L,); SET rewiring (:mod:`xmc.sparse.dst`) edits them in place.
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        fan_in: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        seed: int = 0,
        label_offset: int = 0,
        group: int = 1,
    ) -> None:
        super().__init__()
        self.in_features, self.num_labels, self.label_offset = in_features, num_labels, label_offset
        self.layer = FixedFanInLinear(
            in_features,
            num_labels,
            fan_in,
            bias,
            device,
            dtype,
            seed=seed,
            row_offset=label_offset,
            group=group,
        )

    @property
    def fan_in(self) -> int:
        return self.layer.fan_in

    @property
    def group(self) -> int:
        return self.layer.group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer(h)

    def label_chunk(self, batch_size: int) -> int:
        """Whole groups of labels per chunk (a chunk's ids are its groups' id rows)."""
        step = super().label_chunk(batch_size)
        return step if step >= self.num_labels else max(self.group, step - step % self.group)

    def chunk_logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        layer = self.layer
        bias = None if layer.bias is None else layer.bias[start:stop]
        if layer.group > 1:
            ids = self._group_rows(start, stop)
            return grouped_fanin(h, layer.weight[start:stop], ids, layer.group, bias)
        return fixed_fanin(h, layer.weight[start:stop], layer.indices[start:stop], bias)

    def _group_rows(self, start: int, stop: int) -> torch.Tensor:
        """The id rows of labels ``start..stop-1``, ``start`` a multiple of G."""
        group = self.layer.group
        if start % group:
            raise ValueError(
                f"a label chunk of a grouped layer starts on a group boundary (G = {group}), got {start}"
            )
        return self.layer.indices[start // group : num_groups(stop, group)]

    def chunk_backward(self, h, grad_logits, start, stop, need_input=True):
        layer = self.layer
        grad_logits = grad_logits.to(h.dtype)
        if layer.group > 1:
            return self._grouped_chunk_backward(h, grad_logits, start, stop, need_input)
        has_bias = layer.bias is not None
        grad_h = None
        if need_input and use_triton("auto", h, layer.weight):
            # The input gradient of labels start..stop-1 reads the layer's cached column view (their slots
            # found by binary search): a label chunk never sorts its own ids.
            grad_h = fixed_fanin_input_gradient_triton(
                grad_logits, h, layer.weight, *layer.column_transpose(), row_start=start
            )
            need_input = False
        # The reference path takes the cached view only for the whole layer.
        whole = (start, stop) == (0, self.num_labels)
        col_ptr, slots = layer.column_transpose() if whole else (None, None)
        part_h, grad_w, grad_b = fixed_fanin_backward(
            grad_logits,
            h,
            layer.weight[start:stop],
            layer.indices[start:stop],
            col_ptr,
            slots,
            need_x=need_input,
            need_w=True,
            need_b=has_bias,
        )
        return (grad_h if grad_h is not None else part_h), [grad_w] + ([grad_b] if has_bias else [])

    def chunk_loss_step(self, h, rows, cols, kind, scale, start, stop, need_input):
        """On the Triton path (plain layer, the fused pass's float scale, any batch): one fused kernel per
        label range computes the chunk's logits, loss and gradients (:mod:`xmc.kernels.fixed_fanin_loss`)."""
        layer = self.layer
        fused = (
            _FUSED_KERNEL["usable"]
            and isinstance(scale, float)
            and layer.group == 1
            and use_triton("auto", h, layer.weight)
        )
        if not fused:
            return super().chunk_loss_step(h, rows, cols, kind, scale, start, stop, need_input)
        # Fixed inputs (need_input False) never read the column view: do not build it after a rewiring.
        transpose = layer.column_transpose() if need_input else (None, None)
        try:
            total, grad_h, grad_w, grad_b = fixed_fanin_loss_triton(
                h,
                layer.weight,
                layer.indices,
                layer.bias,
                rows,
                cols,
                kind,
                scale,
                *transpose,
                row_start=start,
                row_stop=stop,
                need_x=need_input,
            )
        except _KERNEL_BUILD_ERRORS as err:  # a compiler or GPU that cannot build it: train on regardless
            _FUSED_KERNEL["usable"] = False
            log.warning(
                "the fused-loss kernel could not be built here (%s: %s); the classifier falls back to the "
                "per-chunk loss for the rest of this process (same results, slower). Please report it.",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return super().chunk_loss_step(h, rows, cols, kind, scale, start, stop, need_input)
        return total, grad_h, [grad_w] + ([grad_b] if layer.bias is not None else [])

    def _grouped_chunk_backward(self, h, grad_logits, start, stop, need_input):
        layer = self.layer
        has_bias = layer.bias is not None
        grad_h = None
        if need_input and use_triton("auto", h, layer.weight):
            # As the plain layer: the chunk's input gradient reads the whole layer's cached column view.
            grad_h = grouped_fanin_input_gradient_triton(
                grad_logits, h, layer.weight, layer.group, *layer.column_transpose(), row_start=start
            )
            need_input = False
        part_h, grad_w, grad_b = grouped_fanin_backward(
            grad_logits,
            h,
            layer.weight[start:stop],
            self._group_rows(start, stop),
            layer.group,
            need_x=need_input,
            need_w=True,
            need_b=has_bias,
        )
        return (grad_h if grad_h is not None else part_h), [grad_w] + ([grad_b] if has_bias else [])

    def label_bias(self) -> nn.Parameter | None:
        return self.layer.bias

    def label_parameters(self) -> list[nn.Parameter]:
        return [self.layer.weight] + ([self.layer.bias] if self.layer.bias is not None else [])

    @classmethod
    def state_bytes(
        cls,
        in_features: int,
        num_labels: int,
        *,
        batch_size: int = 0,
        optimizer: str = "adamw",
        param_bytes: int = 4,
        master_weights: bool = False,
        bias: bool = True,
        fan_in: int = 32,
        group: int = 1,
    ) -> dict[str, int]:
        num_params = num_labels * fan_in + (num_labels if bias else 0)
        slots = num_groups(num_labels, group) * fan_in  # id slots: one id row per group of G labels
        parts = {
            "weights": num_params * param_bytes,
            "indices": slots * index_dtype(in_features).itemsize,
            # The input-gradient kernel's column view of the pattern: slot ids and D + 1 int64 pointers.
            "transpose": slots * (4 if slots < 2**31 else 8) + 8 * (in_features + 1),
            "master_weights": 4 * num_params if master_weights else 0,
            "gradients": num_params * param_bytes,
            "optimizer": optimizer_state_bytes(num_params, optimizer),
            "logits": logits_bytes(num_labels, batch_size),
            # With several label chunks, one chunk's weight gradient exists before it is written.
            "chunk_gradient": chunk_gradient_bytes(num_labels, batch_size, fan_in + bias, param_bytes),
        }
        if group > 1:  # the grouped input gradient's per-slot products of a range of groups (fp32)
            parts["group_products"] = min(GROUP_BUFFER_BYTES, slots * max(batch_size, 1) * 4)
        return parts

    def shape_options(self) -> dict:
        options = {"bias": self.layer.bias is not None, "fan_in": self.layer.fan_in}
        return options | ({"group": self.layer.group} if self.layer.group > 1 else {})

    def shard(self, rank: int, world: int) -> FixedFanInClassifier:
        if self.layer.group > 1:
            raise ValueError(
                "label sharding (train.parallel=labels) needs shards on group boundaries, which grouped "
                "fan-in (classifier.fan_in_group > 1) does not provide yet: use train.parallel=data"
            )
        start, stop = shard_range(self.num_labels, rank, world)
        layer = self.layer
        part = FixedFanInClassifier(
            self.in_features,
            stop - start,
            layer.fan_in,
            layer.bias is not None,
            layer.weight.device,
            layer.weight.dtype,
            seed=layer.seed,
            label_offset=self.label_offset + start,
        )
        with torch.no_grad():
            part.layer.weight.copy_(layer.weight[start:stop])
            part.layer.indices.copy_(layer.indices[start:stop])
            if layer.bias is not None:
                part.layer.bias.copy_(layer.bias[start:stop])
        return part
