"""Where and how a run computes: its device, its precision and autocast, and its peak memory.

Each has one definition here; training, prediction, the memory planner's measurement, ``xmc embed`` and
the benchmarks all ask this module.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
from pathlib import Path

import torch


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """``auto`` (CUDA when present), ``cuda`` or ``cpu`` as a device; ``option`` names the setting the
    value came from, for the error when ``cuda`` is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}=cuda but no CUDA device is available: use {option}=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, bf16: bool | None = None, strict: bool = False) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on a GPU that has it, else fp32 (``no``).
    ``bf16``: whether the GPU has bf16 (default: ask CUDA), so a CPU can resolve a GPU's choice. An
    explicit choice is returned as it is; ``strict`` (training) refuses an explicit bf16 on a GPU
    without it."""
    has_bf16 = device.type == "cuda" and (torch.cuda.is_bf16_supported() if bf16 is None else bf16)
    if name == "auto":
        return "bf16" if has_bf16 else "no"
    if strict and name == "bf16" and device.type == "cuda" and not has_bf16:
        raise ValueError("train.precision=bf16 but this GPU has no bf16: use fp16 or no")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (``no``: none)."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and the threads PyTorch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def resident_bytes() -> tuple[int, int]:
    """(current, peak) resident bytes of this process: Linux ``/proc`` (VmRSS, VmHWM), else the peak of
    ``getrusage`` for both."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
        )
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return peak, peak


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or the kernel's resident high-water mark (Linux
    4.0 and later). False where the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory since the last reset: ``{"allocated", "reserved"}`` bytes on CUDA, ``{"rss"}`` (the
    process's resident high-water mark) on the CPU."""
    if device.type == "cuda":
        return {
            "allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device),
        }
    return {"rss": resident_bytes()[1]}


def peak_memory_label(device: torch.device) -> str:
    """:func:`peak_memory` in GiB for a progress bar: allocated on CUDA, resident on the CPU."""
    peak = peak_memory(device)
    return f"{peak.get('allocated', peak.get('rss', 0)) / 2**30:.1f}G"
