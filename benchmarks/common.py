"""Shared by the benchmark scripts: the git revision, appending a results row, the peer's TF-IDF recipe,
and the device helpers of the GPU benchmarks (timing, peak memory, the copy bandwidth and matmul rates that
floors are measured against). Every helper also runs on the CPU, at small sizes, so a benchmark's code
path is smoke-tested there (``benchmarks/gpu_suite.py --tiny``) before a GPU session runs it."""

from __future__ import annotations

import datetime as dt
import gc
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

GIB = 2**30
# The peer's TF-IDF recipe (scikit-learn TfidfVectorizer options): words and bigrams, as PECOS's EURLEX57K
# baseline; bench_pecos_eurlex.py and the re-ranking probes share it
PEER_TFIDF = {"ngram_range": (1, 2), "min_df": 2, "max_features": 200_000, "sublinear_tf": True}


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files have uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def append_row(path: Path, row: dict) -> None:
    """Print ``row`` as JSON and append it to the JSON-lines file ``path``."""
    print(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def pick_device(name: str):
    """``torch.device`` for ``auto`` (CUDA when present), ``cuda`` or ``cpu``
    (:func:`xmc.runtime.resolve_device`); exits with the fix when ``cuda`` is asked for and absent."""
    from xmc.runtime import resolve_device

    try:
        return resolve_device(name, "--device")
    except ValueError as err:
        raise SystemExit(f"{err} (a GPU benchmark smoke-tests on the CPU at small sizes)") from None


def device_name(device) -> str:
    from xmc.runtime import device_name as name

    return name(device)


def environment(device) -> dict:
    """Device, library versions, git revision and date: the columns every results row starts with."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git_revision(),
        "date": dt.date.today().isoformat(),
    }


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    """Collect garbage and, on CUDA, return cached blocks, so the next measurement starts clean."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device) -> int:
    """Bytes allocated by tensors on ``device`` now (0 on the CPU, where the allocator is not tracked)."""
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device) -> None:
    """Start a new CUDA peak (:func:`xmc.runtime.reset_peak_memory`); nothing on the CPU."""
    from xmc.runtime import reset_peak_memory

    if device.type == "cuda":
        reset_peak_memory(device)


def peak_allocated(device) -> int | None:
    """Peak bytes allocated since :func:`reset_peak` (CUDA); None on the CPU."""
    from xmc.runtime import peak_memory

    if device.type != "cuda":
        return None
    synchronize(device)
    return peak_memory(device)["allocated"]


def timed(fn, device=None) -> dict:
    """Median and 20th / 80th percentile of ``fn()`` in ms: CUDA events (``triton.testing.do_bench``,
    after warm-up) on CUDA; on the CPU (smoke tests) wall time of two calls after one."""
    if device is None or device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "p20_ms": p20, "p80_ms": p80}
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"ms": statistics.median(times), "p20_ms": times[0], "p80_ms": times[-1]}


def copy_bandwidth(device, nbytes: int = GIB) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes``, counting bytes read plus bytes written."""
    import torch

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device)["ms"]
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(device, dtype=None, n: int = 8192, tf32: bool = False) -> float:
    """FLOP/s of an ``n``^3 product of random data: bf16 on tensor cores, fp32 with TF32 off (CUDA
    cores) or, with ``tf32``, fp32 inputs on TF32 tensor cores."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = timed(lambda: a @ b, device)["ms"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3)
