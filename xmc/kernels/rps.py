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
gives 32 signs. The hash is the avalanche ``mix32`` of :mod:`xmc.kernels.hashing` folded over 32-bit keys, ``fold(s,
k) = mix32((s ^ k) + 0x9E3779B9 mod 2**32)``, h(seed, a, b) = fold(fold(S, a), b) with the seed state S =
``hash_keys(seed, salt)`` (one salt per use); keys are taken mod 2**32 (labels, columns and pieces stay below
that). Torch computes it in int64, Triton in uint32 (which wraps mod 2**32): the same bits.

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

Every kernel has a plain-PyTorch twin (``rps_forward_reference`` / ``rps_backward_reference``), chunked over
labels; it is the CPU training path and the test oracle. It gathers a label chunk's weights from the array
doubled with its negation (``[array, -array]``: the sign is part of the slot id, ``slot + m`` for a negative
sign) and multiplies; the array gradient is an ``index_add_`` of G into the doubled buffer. Hashing every
weight every step costs more on a CPU than the step itself, so the reference can read the slot table from an
``RPSTableCache``: int32 ids of a row range (4 bytes per weight, 54 MB at L = 52,946, D = 256), a speed cache
for CPU training that is not model state and not counted in the planner's memory rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.autograd.function import once_differentiable

from xmc.kernels._common import jit as _jit
from xmc.kernels._common import tl, triton
from xmc.kernels.hashing import fold32, hash_keys, mix32

__all__ = [
    "METHODS",
    "RPSFunction",
    "RPSMapping",
    "RPSTableCache",
    "rps_backward",
    "rps_backward_reference",
    "rps_backward_triton",
    "rps_forward",
    "rps_forward_reference",
    "rps_forward_triton",
    "rps_linear",
    "rps_slots",
    "rps_slots_triton",
    "rps_table",
    "rps_weight",
]

METHODS = ("hashednet", "roast", "stable")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "reference")

_M32 = 0xFFFFFFFF
_SALTS = {"hashednet": 0x48A5, "roast": 0x52F1, "stable": 0x5713, "sign": 0x5167}

# Fixed block sizes (GPU tuning comes later); tl.dot needs every block dimension >= 16.
_FWD_BLOCK_L, _FWD_BLOCK_D, _MAX_BLOCK_B = 64, 32, 64
_BWD_X_BLOCK_L, _BWD_X_BLOCK_D, _BWD_X_MAX_SPLITS = 32, 64, 32
_BWD_A_BLOCK_L, _BWD_A_BLOCK_D = 64, 32

# The reference materializes at most this many weights at a time (64 MiB in fp32).
REFERENCE_CHUNK_ELEMENTS = 2**24
# Hashing temporaries are int64 (several per weight): hash this many weights at a time.
_HASH_CHUNK_ELEMENTS = 2**20


@dataclass(frozen=True)
class RPSMapping:
    """Everything that decides ``(slot, sign)`` of a weight: method, ``size`` m, the whole layer's shape
    (``num_labels`` L, ``in_features`` D), ``seed``, ``sign`` and the (TL, TD) ``tile`` of ROAST / STABLE."""

    method: str
    size: int
    num_labels: int
    in_features: int
    seed: int = 0
    sign: bool = True
    tile: tuple[int, int] = (32, 64)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RPS method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.size < 1:
            raise ValueError(f"the shared array needs at least one slot, got size={self.size}")
        if not (0 < self.num_labels < 2**32 and 0 < self.in_features < 2**32):
            raise ValueError(
                f"labels and columns must lie in 1..2**32 - 1, got L={self.num_labels}, D={self.in_features}"
            )
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise ValueError(f"tile must be two positive sizes (TL, TD), got {self.tile}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")

    @cached_property
    def seed_states(self) -> tuple[int, int]:
        """The hash states (slot hash, sign hash) of this seed: Python ints in [0, 2**32)."""
        return int(hash_keys(self.seed, _SALTS[self.method])), int(hash_keys(self.seed, _SALTS["sign"]))

    @property
    def table_dtype(self) -> torch.dtype:
        """dtype of signed slot ids ``slot + m * (sign < 0)`` (see :func:`rps_table`)."""
        return torch.int32 if self.size * (2 if self.sign else 1) <= 2**31 else torch.int64


# ----------------------------------------------------------------------------------------------------------
# The mapping in torch
# ----------------------------------------------------------------------------------------------------------


def _fold(state: torch.Tensor | int, key: torch.Tensor) -> torch.Tensor:
    return mix32(((state ^ (key & _M32)) + 0x9E3779B9) & _M32)


def _hash2(state: int, row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor:
    """fold(fold(state, r), c) for r in ``row_keys`` (n,) and c in ``col_keys`` (k,) -> (n, k). Column keys
    repeat (tile columns, groups of 32 columns), so each row is hashed with their range once and read back."""
    row_states = _fold(state, row_keys)[:, None]
    if col_keys.numel() == 0:
        return _fold(row_states, col_keys[None, :])
    c0 = int(col_keys.min())
    grid = torch.arange(c0, int(col_keys.max()) + 1, device=col_keys.device)
    return _fold(row_states, grid[None, :])[:, col_keys - c0]


def rps_slots(
    mapping: RPSMapping, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ids (int64 in [0, m)) and signs (int8, +-1), both (n, k), of the weights at global label ids
    ``rows`` (n,) and columns ``cols`` (k,) (integer tensors)."""
    rows, cols = rows.long().reshape(-1), cols.long().reshape(-1)
    seed_slot, seed_sign = mapping.seed_states
    m, (tl_, td) = mapping.size, mapping.tile
    if mapping.method == "hashednet":
        slots = _fold(_fold(seed_slot, rows)[:, None], cols[None, :]) % m
    elif mapping.method == "roast":
        offsets = _hash2(seed_slot, rows // tl_, cols // td) % m
        slots = (offsets + (rows % tl_ * td)[:, None] + (cols % td)[None, :]) % m
    else:
        v = _stable_position(rows, cols, mapping)
        piece = v // m
        lo = int(piece.min()) if piece.numel() else 0
        hi = int(piece.max()) + 1 if piece.numel() else 0
        shifts = _fold(seed_slot, torch.arange(lo, hi, device=v.device)) % m  # one hash per piece
        slots = v - piece * m + shifts[piece - lo]
        slots = torch.where(slots >= m, slots - m, slots)
    if mapping.sign:  # bit d mod 32 of a hash of (l, d // 32): one hash gives 32 signs
        bits = _hash2(seed_sign, rows, cols >> 5) >> (cols & 31)[None, :]
        signs = (1 - 2 * (bits & 1)).to(torch.int8)
    else:
        signs = torch.ones_like(slots, dtype=torch.int8)
    return slots, signs


def _stable_position(rows: torch.Tensor, cols: torch.Tensor, mapping: RPSMapping) -> torch.Tensor:
    """v(l, d) (n, k) for rows (n,), cols (k,): the tile-major position of a weight, a bijection of the
    L x D weights onto [0, L * D)."""
    (tl_, td), L, D = mapping.tile, mapping.num_labels, mapping.in_features
    tile_row, tile_col = rows // tl_, cols // td
    height = (L - tile_row * tl_).clamp(max=tl_)  # the last tile row may be short ...
    width = (D - tile_col * td).clamp(max=td)  # ... and so may the last tile column
    row_base = tile_row * tl_ * D  # (n,): tile rows above
    tile_base = height[:, None] * (tile_col * td)[None, :]  # (n, k): tiles to the left in this tile row
    inside = (rows - tile_row * tl_)[:, None] * width[None, :] + (cols - tile_col * td)[None, :]
    return row_base[:, None] + tile_base + inside


def rps_table(
    mapping: RPSMapping, row_start: int, num_rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Signed slot ids ``slot + m * (sign < 0)`` (``mapping.table_dtype``, (num_rows, D)) of the global
    rows ``row_start .. row_start + num_rows - 1``: indices into ``[array, -array]`` (into ``array`` when
    unsigned)."""
    D, m = mapping.in_features, mapping.size
    table = torch.empty((num_rows, D), dtype=mapping.table_dtype, device=device)
    cols = torch.arange(D, device=device)
    step = max(1, _HASH_CHUNK_ELEMENTS // D)
    for lo in range(0, num_rows, step):
        hi = min(num_rows, lo + step)
        slots, signs = rps_slots(mapping, torch.arange(row_start + lo, row_start + hi, device=device), cols)
        table[lo:hi] = slots + m * (signs < 0) if mapping.sign else slots
    return table


class RPSTableCache:
    """CPU speed cache of the reference path: the :func:`rps_table` of a fixed row range, filled lazily in
    blocks of rows on first use. Not model state (rebuilt from the mapping), not counted by the planner;
    4 bytes per weight (int32 ids), 54 MB for 52,946 labels x 256."""

    BLOCK_ROWS = 4096

    def __init__(
        self, mapping: RPSMapping, row_start: int, num_rows: int, device: torch.device | str = "cpu"
    ):
        self.mapping, self.row_start, self.num_rows = mapping, row_start, num_rows
        self.device = torch.device(device)
        self.table = torch.empty((num_rows, mapping.in_features), dtype=mapping.table_dtype, device=device)
        self._filled = [False] * math.ceil(num_rows / self.BLOCK_ROWS)

    def covers(self, mapping: RPSMapping, start: int, stop: int, device: torch.device) -> bool:
        return (
            mapping == self.mapping
            and device == self.device
            and self.row_start <= start <= stop <= self.row_start + self.num_rows
        )

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Table rows of global labels ``start .. stop - 1`` (a view)."""
        lo, hi = start - self.row_start, stop - self.row_start
        for block in range(lo // self.BLOCK_ROWS, math.ceil(hi / self.BLOCK_ROWS)):
            if not self._filled[block]:
                a = block * self.BLOCK_ROWS
                b = min(self.num_rows, a + self.BLOCK_ROWS)
                self.table[a:b] = rps_table(self.mapping, self.row_start + a, b - a, self.device)
                self._filled[block] = True
        return self.table[lo:hi]


def _table(mapping, start, num_rows, cache, device) -> torch.Tensor:
    if cache is not None and cache.covers(mapping, start, start + num_rows, device):
        return cache.rows(start, start + num_rows)
    return rps_table(mapping, start, num_rows, device)


# ----------------------------------------------------------------------------------------------------------
# Triton: the mapping and the kernels
# ----------------------------------------------------------------------------------------------------------


@_jit
def _rps_map(
    rows,
    cols,
    L,
    D,
    M,
    seed_slot,
    seed_sign,
    METHOD: tl.constexpr,
    SIGN: tl.constexpr,
    TILE_L: tl.constexpr,
    TILE_D: tl.constexpr,
):
    """rows (BLOCK_L, 1) int64 global label ids, cols (1, BLOCK_D) int64 -> slot int64 and sign float32, both
    (BLOCK_L, BLOCK_D); :func:`rps_slots` bit for bit. METHOD: 0 hashednet, 1 roast, 2 stable."""
    s = seed_slot.to(tl.uint32)
    if METHOD == 0:
        slot = fold32(fold32(s, rows.to(tl.uint32)), cols.to(tl.uint32)).to(tl.int64) % M
    elif METHOD == 1:
        tile_row = rows // TILE_L
        tile_col = cols // TILE_D
        offset = fold32(fold32(s, tile_row.to(tl.uint32)), tile_col.to(tl.uint32)).to(tl.int64) % M
        slot = (offset + (rows - tile_row * TILE_L) * TILE_D + (cols - tile_col * TILE_D)) % M
    else:
        tile_row = rows // TILE_L
        tile_col = cols // TILE_D
        height = tl.minimum(L - tile_row * TILE_L, TILE_L)
        width = tl.minimum(D - tile_col * TILE_D, TILE_D)
        v = tile_row * TILE_L * D + height * tile_col * TILE_D
        v = v + (rows - tile_row * TILE_L) * width + (cols - tile_col * TILE_D)
        piece = v // M
        slot = (v - piece * M + fold32(s, piece.to(tl.uint32)).to(tl.int64) % M) % M
    if SIGN:
        bits = fold32(fold32(seed_sign.to(tl.uint32), rows.to(tl.uint32)), (cols >> 5).to(tl.uint32))
        sign = 1.0 - 2.0 * ((bits >> (cols & 31).to(tl.uint32)) & 1).to(tl.float32)
    else:
        sign = tl.zeros_like(slot).to(tl.float32) + 1.0
    return slot, sign


_SEEDS = [
    "seed_slot",
    "seed_sign",
]  # never specialize on their values (a seed state of 1 would become constexpr)


@_jit(do_not_specialize=_SEEDS)
def _rps_map_kernel(
    slot_ptr,
    sign_ptr,
    N,
    D,
    L,
    M,
    row_start,
    seed_slot,
    seed_sign,
    METHOD: tl.constexpr,
    SIGN: tl.constexpr,
    TILE_L: tl.constexpr,
    TILE_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """slot (N, D) int64 and sign (N, D) int8 of rows row_start .. row_start + N - 1 (tests and tools)."""
    offs_l = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_l < N)[:, None] & (offs_d < D)[None, :]
    slot, sign = _rps_map(
        (row_start + offs_l)[:, None],
        offs_d[None, :],
        L,
        D,
        M,
        seed_slot,
        seed_sign,
        METHOD,
        SIGN,
        TILE_L,
        TILE_D,
    )
    offs = offs_l[:, None] * D + offs_d[None, :]
    tl.store(slot_ptr + offs, slot, mask=mask)
    tl.store(sign_ptr + offs, sign.to(tl.int8), mask=mask)


@_jit(do_not_specialize=_SEEDS)
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
        slot, sign = _rps_map(
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


@_jit(do_not_specialize=_SEEDS)
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
        slot, sign = _rps_map(
            (row_start + offs_l)[:, None],
            offs_d[None, :],
            L,
            D,
            M,
            seed_slot,
            seed_sign,
            METHOD,
            SIGN,
            TILE_L,
            TILE_D,
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


@_jit(do_not_specialize=_SEEDS)
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
        slot, sign = _rps_map(
            (row_start + offs_l)[:, None],
            offs_d[None, :],
            L,
            D,
            M,
            seed_slot,
            seed_sign,
            METHOD,
            SIGN,
            TILE_L,
            TILE_D,
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


# ----------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use backend='reference' (the CPU path)")


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output the kernels fully write (uninitialised; tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_b(batch: int) -> int:
    return max(16, min(_MAX_BLOCK_B, triton.next_power_of_2(max(batch, 1))))


def _map_args(mapping: RPSMapping) -> dict:
    return dict(
        METHOD=METHODS.index(mapping.method),
        SIGN=mapping.sign,
        TILE_L=mapping.tile[0],
        TILE_D=mapping.tile[1],
    )


def _check(x, array, bias, mapping, row_start, num_rows, float_dtypes) -> None:
    """Shapes, dtypes and devices shared by both backends."""
    if x.dim() != 2 or x.shape[1] != mapping.in_features:
        raise ValueError(f"x must be (B, D) with D = {mapping.in_features}, got shape {tuple(x.shape)}")
    if array.shape != (mapping.size,):
        raise ValueError(
            f"array must have shape ({mapping.size},) (the mapping's size), got {tuple(array.shape)}"
        )
    if not 0 <= row_start <= row_start + num_rows <= mapping.num_labels:
        raise ValueError(
            f"rows {row_start}..{row_start + num_rows - 1} are outside the layer's "
            f"{mapping.num_labels} labels"
        )
    if bias is not None and bias.shape != (num_rows,):
        raise ValueError(f"bias must have shape ({num_rows},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("array", array), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in float_dtypes:
            raise ValueError(f"{name} dtype {t.dtype} is not one of {float_dtypes}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def rps_slots_triton(
    mapping: RPSMapping, row_start: int, num_rows: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton mapping: slot ids int64 and signs int8, both (num_rows, D), of global rows from
    ``row_start``; equal to :func:`rps_slots` (the tests check it)."""
    _require_triton()
    D = mapping.in_features
    slots = _new_output((num_rows, D), torch.int64, torch.device(device))
    signs = _new_output((num_rows, D), torch.int8, torch.device(device))
    if slots.numel():
        grid = (triton.cdiv(num_rows, 32), triton.cdiv(D, 32))
        _rps_map_kernel[grid](
            slots,
            signs,
            num_rows,
            D,
            mapping.num_labels,
            mapping.size,
            row_start,
            *mapping.seed_states,
            **_map_args(mapping),
            BLOCK_L=32,
            BLOCK_D=32,
        )
    return slots, signs


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
    _require_triton()
    _check(x, array, bias, mapping, row_start, num_rows, TRITON_DTYPES)
    array = array.contiguous()
    B = x.shape[0]
    out = _new_output((B, num_rows), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_b = _block_b(B)
    grid = (triton.cdiv(num_rows, _FWD_BLOCK_L), triton.cdiv(B, block_b))
    _rps_fwd_kernel[grid](
        x, array, bias.contiguous() if bias is not None else array, out,
        B, num_rows, mapping.in_features, mapping.num_labels, mapping.size, row_start, *mapping.seed_states,
        float(scale), x.stride(0), x.stride(1), out.stride(0), out.stride(1), **_map_args(mapping),
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
    _require_triton()
    B, num_rows = grad_out.shape
    _check(x, array, None, mapping, row_start, num_rows, TRITON_DTYPES)
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
                grad_out.stride(0), grad_out.stride(1), **_map_args(mapping), FP32_DOT=fp32_dot,
                BLOCK_B=block_b, BLOCK_L=_BWD_X_BLOCK_L, BLOCK_D=_BWD_X_BLOCK_D,
            )  # fmt: skip
        grad_x = partial.sum(0).to(x.dtype)
    if need_array or need_bias:
        buffer = torch.zeros(mapping.size if need_array else 1, dtype=torch.float32, device=x.device)
        grad_bias = _new_output((num_rows,), array.dtype, x.device) if need_bias else buffer
        if num_rows and B:
            grid = (
                triton.cdiv(num_rows, _BWD_A_BLOCK_L),
                triton.cdiv(D, _BWD_A_BLOCK_D) if need_array else 1,
            )
            _rps_bwd_array_kernel[grid](
                grad_out, x, buffer, grad_bias, B, *args, float(grad_scale),
                grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), **_map_args(mapping),
                NEED_ARRAY=need_array, NEED_BIAS=need_bias, FP32_DOT=fp32_dot,
                BLOCK_B=block_b, BLOCK_L=_BWD_A_BLOCK_L, BLOCK_D=_BWD_A_BLOCK_D,
            )  # fmt: skip
        elif need_bias:
            grad_bias.zero_()
        grad_array = buffer.to(array.dtype) if need_array else None
        grad_bias = grad_bias if need_bias else None
    return grad_x, grad_array, grad_bias


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------------------


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


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
    _check(x, array, bias, mapping, row_start, num_rows, (*TRITON_DTYPES, torch.float64))
    with torch.autocast(x.device.type, enabled=False):
        acc = _accumulation_dtype(x.dtype, array.dtype)
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
    _check(x, array, None, mapping, row_start, num_rows, (*TRITON_DTYPES, torch.float64))
    if B != x.shape[0] or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be (B, n) on {x.device} with B = {x.shape[0]}, got "
            f"{tuple(grad_out.shape)} on {grad_out.device}"
        )
    with torch.autocast(x.device.type, enabled=False):
        acc = _accumulation_dtype(x.dtype, array.dtype, grad_out.dtype)
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


# ----------------------------------------------------------------------------------------------------------
# Dispatch and autograd
# ----------------------------------------------------------------------------------------------------------


def _use_triton(backend: str, x: torch.Tensor, array: torch.Tensor) -> bool:
    """``auto``: Triton when x is on CUDA in a dtype the kernels take, else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return triton is not None and x.is_cuda and x.dtype in TRITON_DTYPES and array.dtype in TRITON_DTYPES
    return backend == "triton"


def rps_forward(x, array, bias, mapping, *, row_start, num_rows, scale, backend="auto", cache=None):
    """logits (B, num_rows); ``backend`` is ``auto``, ``triton`` or ``reference`` (``cache``: see
    :class:`RPSTableCache`, used by the reference only)."""
    kwargs = dict(row_start=row_start, num_rows=num_rows, scale=scale)
    if _use_triton(backend, x, array):
        return rps_forward_triton(x, array, bias, mapping, **kwargs)
    return rps_forward_reference(x, array, bias, mapping, **kwargs, cache=cache)


def rps_backward(grad_out, x, array, mapping, *, row_start, scale, grad_scale, need_x=True, need_array=True,
                 need_bias=True, backend="auto", cache=None):  # fmt: skip
    """(grad_x, grad_array, grad_bias), None where not needed."""
    kwargs = dict(row_start=row_start, scale=scale, grad_scale=grad_scale, need_x=need_x,
                  need_array=need_array, need_bias=need_bias)  # fmt: skip
    if _use_triton(backend, x, array):
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
