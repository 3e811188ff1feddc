"""Triton where it is installed (a Linux-only dependency), stand-ins elsewhere, and the launch helpers every
op shares.

Without Triton, ``triton`` is None (launchers check it and the reference twins run), ``tl.constexpr`` is
``int`` so module-level constants and kernel signatures still evaluate, and ``jit`` returns the function
unchanged (with or without keyword arguments).

The helpers: the float dtypes the kernels take (``TRITON_DTYPES``) and the ``BACKENDS`` an op dispatches
between (:func:`use_triton`), :func:`require_triton` at the top of every launcher, :func:`new_output` for
every output a kernel writes in full, :func:`block` for power-of-two block sizes and
:func:`accumulation_dtype` for the reference twins.
"""

from __future__ import annotations

import torch

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

__all__ = [
    "BACKENDS",
    "TRITON_DTYPES",
    "accumulation_dtype",
    "block",
    "jit",
    "new_output",
    "require_triton",
    "tl",
    "triton",
    "use_triton",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "reference")


def use_triton(backend: str, x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernels. ``backend`` is one of ``BACKENDS``; ``auto``: Triton when it is
    installed, x is on CUDA and x and ``others`` all have dtypes the kernels take, else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return triton is not None and x.is_cuda and all(t.dtype in TRITON_DTYPES for t in (x, *others))
    return backend == "triton"


def require_triton(hint: str = "use backend='reference' (the CPU path)") -> None:
    """Raise when Triton is not installed; ``hint`` says what to use instead."""
    if triton is None:
        raise RuntimeError(f"Triton is not installed; {hint}")


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output the kernels write in full (uninitialised; tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block(size: int, cap: int) -> int:
    """Power-of-two block no larger than needed for ``size``, at most ``cap``."""
    return min(cap, triton.next_power_of_2(max(size, 1)))


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """What the reference twins accumulate in: float64 when any operand is float64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
