"""The randomized-parameter-sharing classifier: HashedNet, ROAST and STABLE-RPS behind one interface.

Every weight of the L x D classifier is read from one shared array of m slots (see :mod:`xmc.kernels.rps` for
the mappings, the kernels and why STABLE-RPS divides the array gradient by ``scale**2``):

    W[l, d] = scale * sign(l, d) * array[slot(l, d)]

The array starts N(0, ``array_std``^2) and ``scale = init_scale / array_std`` (the module scale factor of
ROAST), so the materialized W starts with standard deviation ``init_scale`` (default 1 / sqrt(D)) whatever
the compression and whatever the array's own initialization scale. By default ``array_std = init_scale``
(scale 1): an adaptive optimizer (AdamW) moves every slot by about ``lr`` whatever its gradient's scale,
so its step in weight space is ``lr * scale``; at scale 1/16 (array std 1, D = 256) CiteULike-t's
STABLE-RPS reached dev P@1 4.3 after one epoch where scale 1 reached 15.3.
That scale is where the variants part: without gradient scaling the SGD step in weight space is ``lr *
scale**2 * (...)``, so a different ``array_std`` silently changes the effective learning rate by its
inverse square; STABLE-RPS divides the slot gradient by ``scale**2`` and trains the same weights the same
way for any ``array_std``.

Training memory depends on m, not on L * D, apart from the bias and the chunked loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmc.classifiers.base import Classifier
from xmc.classifiers.chunked import label_chunk, shard_range
from xmc.kernels.rps import rps_backward, rps_linear
from xmc.kernels.rps_mapping import METHODS, RPSMapping, RPSTableCache, rps_slots
from xmc.kernels.rps_reference import REFERENCE_CHUNK_ELEMENTS, rps_weight
from xmc.memory.bytes import chunk_gradient_bytes, logits_bytes, optimizer_state_bytes

# The CPU slot-table cache (4 bytes per weight) is kept up to this many weights (1 GiB); beyond it the
# reference path hashes every label chunk on every call.
CACHE_MAX_ELEMENTS = 2**28


def shared_size(num_weights: int, size: int | None, compression: float | None) -> int:
    """Slots m of the shared array from exactly one of ``size`` (m itself) or ``compression`` (m =
    ceil(L * D / compression))."""
    if (size is None) == (compression is None):
        raise ValueError(
            "give exactly one of size (the shared array's slots, e.g. size=1000000) or compression "
            f"(L * D / slots, e.g. compression=8); got size={size}, compression={compression}"
        )
    if size is not None:
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive whole number of slots, got {size}")
        return int(size)
    if not compression > 0:
        raise ValueError(
            f"compression must be positive (e.g. 8 for an array of L * D / 8 slots), got {compression}"
        )
    return max(1, math.ceil(num_weights / compression))


class RPSClassifier(Classifier):
    """An L x D classifier whose weights live in one shared ``array`` (m,) (see the module docstring).

    ``method``: ``stable`` (default), ``roast`` or ``hashednet``. Exactly one of ``size`` (m) or
    ``compression`` (m = ceil(L * D / compression), L the whole layer's labels). ``sign``: random per-weight
    signs. ``tile``: (TL, TD) of ROAST / STABLE. ``array_std``: the array's initial std (default
    ``init_scale``). ``stable_grad``: divide the array gradient by ``scale**2``
    (default on for ``stable`` only; off gives the "unscaled" variant). ``bias``: an ordinary (L,) bias,
    zero-initialized. ``label_offset``: global id of local label 0; ``total_labels``: the whole (unsharded)
    layer's label count, default ``label_offset + num_labels`` (STABLE's tile layout depends on it, so shards
    pass the whole layer's).
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        *,
        method: str = "stable",
        size: int | None = None,
        compression: float | None = None,
        init_scale: float | None = None,
        array_std: float | None = None,
        sign: bool = True,
        tile: tuple[int, int] = (32, 64),
        stable_grad: bool | None = None,
        bias: bool = True,
        seed: int = 0,
        label_offset: int = 0,
        total_labels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        total_labels = label_offset + num_labels if total_labels is None else total_labels
        if num_labels < 1 or label_offset < 0 or label_offset + num_labels > total_labels:
            raise ValueError(
                f"labels {label_offset}..{label_offset + num_labels - 1} do not fit a layer of "
                f"total_labels={total_labels}"
            )
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        size = shared_size(total_labels * in_features, size, compression)
        self.in_features, self.num_labels, self.label_offset = in_features, num_labels, label_offset
        self.mapping = RPSMapping(method, size, total_labels, in_features, seed, bool(sign), tuple(tile))
        self.init_scale = 1.0 / math.sqrt(in_features) if init_scale is None else float(init_scale)
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if array_std is not None and not array_std > 0:
            raise ValueError(f"array_std must be positive, got {array_std}")
        self.array_std = self.init_scale if array_std is None else float(array_std)
        self.scale = self.init_scale / self.array_std  # the factor between a slot's value and a weight
        self.stable_grad = method == "stable" if stable_grad is None else bool(stable_grad)
        generator = torch.Generator().manual_seed(seed)
        initial = torch.randn(size, generator=generator, dtype=torch.float32) * self.array_std
        self.array = nn.Parameter(initial.to(device=device, dtype=dtype or torch.get_default_dtype()))
        self.bias = (
            nn.Parameter(torch.zeros(num_labels, device=device, dtype=self.array.dtype)) if bias else None
        )
        self._cache: RPSTableCache | None = None

    @property
    def method(self) -> str:
        return self.mapping.method

    @property
    def size(self) -> int:
        return self.mapping.size

    @property
    def total_labels(self) -> int:
        return self.mapping.num_labels

    @property
    def grad_scale(self) -> float:
        """Factor of each weight's gradient in its slot's: ``scale`` (true gradient) or ``1 / scale``
        (divided by ``scale**2``, STABLE-RPS)."""
        return 1.0 / self.scale if self.stable_grad else self.scale

    def _table_cache(self, device: torch.device) -> RPSTableCache | None:
        """The reference path's slot-table cache for this classifier's rows (CPU only), rebuilt when the
        mapping or the row range changes."""
        if device.type == "cuda" or self.num_labels * self.in_features > CACHE_MAX_ELEMENTS:
            return None
        cache = self._cache
        stop = self.label_offset + self.num_labels
        if cache is None or not cache.covers(self.mapping, self.label_offset, stop, device):
            cache = self._cache = RPSTableCache(self.mapping, self.label_offset, self.num_labels, device)
        return cache

    def chunk_logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.array.dtype)  # e.g. bf16 activations recomputed outside autocast in backward
        bias = None if self.bias is None else self.bias[start:stop]
        return rps_linear(
            h,
            self.array,
            bias,
            self.mapping,
            row_start=self.label_offset + start,
            num_rows=stop - start,
            scale=self.scale,
            grad_scale=self.grad_scale,
            cache=self._table_cache(h.device),
        )

    def chunk_backward(self, h, grad_logits, start, stop, need_input=True):
        has_bias = self.bias is not None
        grad_h, grad_array, grad_bias = rps_backward(
            grad_logits,
            h,
            self.array,
            self.mapping,
            row_start=self.label_offset + start,
            scale=self.scale,
            grad_scale=self.grad_scale,
            need_x=need_input,
            need_bias=has_bias,
            cache=self._table_cache(h.device),
        )
        return grad_h, ([grad_bias] if has_bias else []) + [grad_array]

    def label_parameters(self) -> list[nn.Parameter]:
        return [self.bias] if self.bias is not None else []

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.array]

    @torch.no_grad()
    def materialize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight (stop - start, D) of local labels ``start..stop-1``, in the array's dtype."""
        stop = self.num_labels if stop is None else stop
        if not 0 <= start <= stop <= self.num_labels:
            raise ValueError(f"labels {start}..{stop - 1} are outside 0..{self.num_labels - 1}")
        return rps_weight(
            self.array,
            self.mapping,
            row_start=self.label_offset + start,
            num_rows=stop - start,
            scale=self.scale,
            cache=self._table_cache(self.array.device),
        )

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Set the array so that :meth:`materialize` returns ``weight`` (num_labels, D): possible only for
        ``stable`` at compression 1 (m = L * D), where the mapping is a bijection. Exact when ``scale``
        (``init_scale / array_std``) is a power of two (e.g. 1, or 1 / sqrt(D) for D a power of four);
        otherwise to within the rounding of one division and one product. A shard sets the slots of its
        own rows only."""
        full = self.total_labels * self.in_features
        if self.method != "stable" or self.size != full:
            raise ValueError(
                f"load_dense needs method='stable' at compression 1 (size = L * D = {full}), where every "
                f"weight has its own slot; this classifier has method={self.method!r}, size={self.size}"
            )
        if tuple(weight.shape) != (self.num_labels, self.in_features):
            raise ValueError(
                f"weight must be ({self.num_labels}, {self.in_features}), got {tuple(weight.shape)}"
            )
        rows = torch.arange(self.label_offset, self.label_offset + self.num_labels, device=self.array.device)
        cols = torch.arange(self.in_features, device=self.array.device)
        slots, signs = rps_slots(self.mapping, rows[:, None], cols[None, :])
        values = weight.to(device=self.array.device, dtype=self.array.dtype) * signs / self.scale
        self.array[slots.reshape(-1)] = values.reshape(-1).to(self.array.dtype)

    @torch.no_grad()
    def slot_counts(self) -> torch.Tensor:
        """How many of this classifier's weights map to each slot: int64 (m,)."""
        counts = torch.zeros(self.size, dtype=torch.int64, device=self.array.device)
        cols = torch.arange(self.in_features, device=self.array.device)[None, :]
        step = max(1, REFERENCE_CHUNK_ELEMENTS // self.in_features)
        for lo in range(0, self.num_labels, step):
            hi = min(self.num_labels, lo + step)
            rows = torch.arange(self.label_offset + lo, self.label_offset + hi, device=self.array.device)
            slots, _ = rps_slots(self.mapping, rows[:, None], cols)
            counts += torch.bincount(slots.reshape(-1), minlength=self.size)
        return counts

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
        method: str = "stable",
        size: int | None = None,
        compression: float | None = None,
    ) -> dict[str, int]:
        """Bytes by component; m from exactly one of ``size`` / ``compression`` (of this layer's labels: a
        label shard replicates the whole layer's array, so plan a shard with the whole layer's ``size``).
        ``workspace``: one label chunk's materialized fp32 weight (the reference path's; the Triton kernels
        keep tiles in registers, so this bounds them) and a chunk's fp32 array gradient where it is not the
        gradient itself (several chunks, or 2-byte parameters; the CPU reference's signed buffer is twice
        that).
        ``chunk_gradient``: a chunk's bias rows before they are written (several chunks only)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        slots = shared_size(num_labels * in_features, size, compression)
        num_params = slots + (num_labels if bias else 0)
        chunk = min(label_chunk(num_labels, batch_size), max(1, REFERENCE_CHUNK_ELEMENTS // in_features))
        # A chunk's fp32 array gradient is a buffer besides the gradient when several chunks are summed
        # into it, or when it is cast to 2-byte parameters; summed chunks of 2-byte parameters add the cast.
        several = label_chunk(num_labels, batch_size) < num_labels
        half = param_bytes != 4
        array_grad = (4 * slots if several or half else 0) + (slots * param_bytes if several and half else 0)
        return {
            "weights": num_params * param_bytes,
            "master_weights": 4 * num_params if master_weights else 0,
            "gradients": num_params * param_bytes,
            "optimizer": optimizer_state_bytes(num_params, optimizer),
            "workspace": 4 * chunk * in_features + array_grad if batch_size else 0,
            "logits": logits_bytes(num_labels, batch_size),
            "chunk_gradient": chunk_gradient_bytes(num_labels, batch_size, int(bias), param_bytes),
        }

    def shape_options(self) -> dict:
        return {"bias": self.bias is not None, "method": self.method, "size": self.size}

    def shard(self, rank: int, world: int) -> RPSClassifier:
        """This rank's contiguous labels; the array is replicated (every shard reads all of it)."""
        start, stop = shard_range(self.num_labels, rank, world)
        mapping = self.mapping
        part = RPSClassifier(
            self.in_features,
            stop - start,
            method=mapping.method,
            size=mapping.size,
            init_scale=self.init_scale,
            array_std=self.array_std,
            sign=mapping.sign,
            tile=mapping.tile,
            stable_grad=self.stable_grad,
            bias=self.bias is not None,
            seed=mapping.seed,
            label_offset=self.label_offset + start,
            total_labels=mapping.num_labels,
            device=self.array.device,
            dtype=self.array.dtype,
        )
        with torch.no_grad():
            part.array.copy_(self.array)
            if self.bias is not None:
                part.bias.copy_(self.bias[start:stop])
        return part

    def extra_repr(self) -> str:
        m = self.mapping
        return (
            f"in_features={self.in_features}, num_labels={self.num_labels}, method={m.method}, "
            f"size={m.size}, compression={m.num_labels * m.in_features / m.size:.3g}, "
            f"init_scale={self.init_scale:.4g}, "
            f"sign={m.sign}, tile={m.tile}, stable_grad={self.stable_grad}, bias={self.bias is not None}"
        )
