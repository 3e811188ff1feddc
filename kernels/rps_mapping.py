"""The RPS mapping: which slot of the shared array, with which sign, each weight of the L x D classifier
reads.

The mappings (``hashednet``, ``roast``, ``stable``), the hash and the signs are defined in the docstring of
:mod:`xmc.kernels.rps`. Held here, for the kernels and the PyTorch twin alike:

- ``RPSMapping``: everything that decides ``(slot, sign)``; ``check_inputs`` checks a layer's tensors
  against it.
- The mapping in torch (int64): ``rps_slots`` for any rows and columns, ``rps_table`` for the signed slot ids
  of a row range, and ``RPSTableCache``, the reference path's CPU speed cache of that table.
- The mapping in Triton (uint32, the same bits): ``rps_map_tl``, inlined by every kernel, with ``map_args``
  (its compile-time arguments) and ``SEED_ARGS`` (the seed states, never specialized on); ``rps_slots_triton``
  runs it alone so the tests can compare it with ``rps_slots``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from xmc.kernels._common import jit as _jit
from xmc.kernels._common import new_output, require_triton, tl, triton
from xmc.kernels.hashing import fold32, hash_keys, mix32

__all__ = [
    "METHODS",
    "RPSMapping",
    "RPSTableCache",
    "SEED_ARGS",
    "check_inputs",
    "map_args",
    "rps_map_tl",
    "rps_slots",
    "rps_slots_triton",
    "rps_table",
]

METHODS = ("hashednet", "roast", "stable")

_M32 = 0xFFFFFFFF
_SALTS = {"hashednet": 0x48A5, "roast": 0x52F1, "stable": 0x5713, "sign": 0x5167}

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


def check_inputs(x, array, bias, mapping, row_start, num_rows, float_dtypes) -> None:
    """Shapes, dtypes and devices of a layer's tensors against its mapping, shared by both backends."""
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


# ----------------------------------------------------------------------------------------------------------
# The mapping in Triton
# ----------------------------------------------------------------------------------------------------------


@_jit
def rps_map_tl(
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


SEED_ARGS = [
    "seed_slot",
    "seed_sign",
]  # never specialize on their values (a seed state of 1 would become constexpr)


@_jit(do_not_specialize=SEED_ARGS)
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
    rows = (row_start + offs_l)[:, None]
    slot, sign = rps_map_tl(
        rows, offs_d[None, :], L, D, M, seed_slot, seed_sign, METHOD, SIGN, TILE_L, TILE_D
    )
    offs = offs_l[:, None] * D + offs_d[None, :]
    tl.store(slot_ptr + offs, slot, mask=mask)
    tl.store(sign_ptr + offs, sign.to(tl.int8), mask=mask)


def map_args(mapping: RPSMapping) -> dict:
    """The compile-time arguments of :func:`rps_map_tl` (METHOD, SIGN, TILE_L, TILE_D) for a kernel launch."""
    return dict(
        METHOD=METHODS.index(mapping.method),
        SIGN=mapping.sign,
        TILE_L=mapping.tile[0],
        TILE_D=mapping.tile[1],
    )


def rps_slots_triton(
    mapping: RPSMapping, row_start: int, num_rows: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton mapping: slot ids int64 and signs int8, both (num_rows, D), of global rows from
    ``row_start``; equal to :func:`rps_slots` (the tests check it)."""
    require_triton()
    D = mapping.in_features
    slots = new_output((num_rows, D), torch.int64, torch.device(device))
    signs = new_output((num_rows, D), torch.int8, torch.device(device))
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
            **map_args(mapping),
            BLOCK_L=32,
            BLOCK_D=32,
        )
    return slots, signs
