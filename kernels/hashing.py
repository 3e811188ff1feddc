"""Counter-based randomness: random numbers that are pure functions of integer keys.

Fixed fan-in layers draw initial ids and weights per (seed, global row) and regrowth ids per
(seed, step, global row). A stateful generator cannot give that: the numbers a row receives would
depend on which rows came before it, so a label shard would differ from the same rows of the whole
layer. A hash of the key can, and it vectorizes over rows on any device.

The mixer is a 32-bit avalanche hash (xor-shift / multiply rounds) computed in int64 tensors. Every
product is kept below 2**63 by multiplying by 16-bit halves of the constant, so no step relies on
signed overflow.

The same hash as Triton helpers for kernels that draw numbers: ``mix32_tl`` is the mixer and
``fold32(state, key) = mix32_tl((state ^ key) + GOLDEN)`` folds one 32-bit key into a state, on uint32
tensors whose products and sums wrap mod 2**32: bit for bit the int64 PyTorch version (``hash_keys``
folds each key as its low then its high 32-bit half).
"""

from __future__ import annotations

import torch
from xmc.kernels._common import jit as _jit
from xmc.kernels._common import tl

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mulmod32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without overflowing int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a tensor of 32-bit keys (int64 holding ``[0, 2**32)``) into 32-bit hashes."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, _C1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _C2)
    return x ^ (x >> 16)


def hash_keys(*keys: torch.Tensor | int, state: torch.Tensor | None = None) -> torch.Tensor:
    """A 32-bit hash (int64 tensor in ``[0, 2**32)``) of a tuple of integer keys, broadcast together.

    Keys may be Python ints or int tensors; each is folded in as two 32-bit halves, so keys up to
    2**63 are distinct. ``state``, a hash this function returned, continues it:
    ``hash_keys(c, state=hash_keys(a, b)) == hash_keys(a, b, c)`` (a shared prefix hashed once).
    """
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64)
        for part in (key & _M32, (key >> 32) & _M32):
            folded = part if state is None else state ^ part
            state = mix32((folded + _GOLDEN) & _M32)
    if state is None:
        raise ValueError("hash_keys needs at least one key")
    return state


def uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Uniform float64 numbers in ``[0, 1)``, one per broadcast key tuple."""
    return hash_keys(*keys).to(torch.float64) / 2.0**32


# The constants as Triton compile-time values.
GOLDEN = tl.constexpr(_GOLDEN)
C1 = tl.constexpr(_C1)
C2 = tl.constexpr(_C2)


@_jit
def mix32_tl(x):
    """:func:`mix32` on uint32 (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * C1
    x = x ^ (x >> 15)
    x = x * C2
    return x ^ (x >> 16)


@_jit
def fold32(state, key):
    """One 32-bit key (uint32) folded into a uint32 state."""
    return mix32_tl((state ^ key) + GOLDEN)
