"""Triton where it is installed (a Linux-only dependency), stand-ins elsewhere.

Without Triton, ``triton`` is None (launchers check it and the reference twins run), ``tl.constexpr`` is
``int`` so module-level constants and kernel signatures still evaluate, and ``jit`` returns the function
unchanged (with or without keyword arguments).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    from types import SimpleNamespace

    triton = None
    tl = SimpleNamespace(constexpr=int)

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

else:
    jit = triton.jit

__all__ = ["jit", "tl", "triton"]
