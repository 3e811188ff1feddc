"""The 32-bit counter-based hash of :mod:`xmc.hashing`, as Triton helpers for kernels that draw numbers.

``mix32`` is the avalanche mixer and ``fold32(state, key) = mix32((state ^ key) + GOLDEN)`` folds one
32-bit key into a state, on uint32 tensors whose products and sums wrap mod 2**32: bit for bit the int64
PyTorch version (``xmc.hashing.hash_keys`` folds each key as its low then its high 32-bit half).
"""

from __future__ import annotations

from xmc.kernels.triton_compat import jit as _jit
from xmc.kernels.triton_compat import tl

GOLDEN = tl.constexpr(0x9E3779B9)
C1 = tl.constexpr(0x7FEB352D)
C2 = tl.constexpr(0x846CA68B)


@_jit
def mix32(x):
    """xmc.hashing.mix32 on uint32 (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * C1
    x = x ^ (x >> 15)
    x = x * C2
    return x ^ (x >> 16)


@_jit
def fold32(state, key):
    """One 32-bit key (uint32) folded into a uint32 state."""
    return mix32((state ^ key) + GOLDEN)
