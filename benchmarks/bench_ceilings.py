"""The device's environment and ceilings (a GPU benchmark; ``--device cpu`` smoke-tests it at small sizes).

One row: GPU name, memory and compute capability, driver, torch / triton / CUDA versions, git revision;
the device-to-device copy bandwidth (bytes read plus written, 1 GiB) and the rates of an 8192^3 matmul in
fp32 with TF32 off (CUDA cores), fp32 inputs on TF32 tensor cores, and bf16. These are the ceilings the
kernel benchmarks' floors are measured against (bench_fixed_fanin.py measures them again in its own run).
Rows go to ``benchmarks/results/ceilings.jsonl``.

    python benchmarks/bench_ceilings.py [--device auto] [--results FILE]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch
from common import GIB, append_row, copy_bandwidth, environment, matmul_rate, pick_device

RESULTS = Path(__file__).parent / "results" / "ceilings.jsonl"


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, where there is one."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--copy-mib", type=int, default=0, help="copy size (default: 1024 on CUDA, 64 on CPU)"
    )
    parser.add_argument(
        "--matmul-n", type=int, default=0, help="matmul size (default: 8192 on CUDA, 256 on CPU)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    copy_bytes = (args.copy_mib or (1024 if cuda else 64)) * 2**20
    n = args.matmul_n or (8192 if cuda else 256)
    row = {**environment(device), "bench": "ceilings"}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        row.update(
            memory_gib=props.total_memory / GIB,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            driver=driver_version(),
            cudnn=torch.backends.cudnn.version(),
        )
    row["copy_bytes"] = copy_bytes
    row["copy_bytes_per_s"] = copy_bandwidth(device, copy_bytes)
    row["matmul_n"] = n
    row["fp32_flops"] = matmul_rate(device, torch.float32, n)
    row["tf32_flops"] = matmul_rate(device, torch.float32, n, tf32=True) if cuda else None
    row["bf16_flops"] = matmul_rate(device, torch.bfloat16, n)
    append_row(args.results, row)
    tf32 = f"{row['tf32_flops'] / 1e12:.0f}" if row["tf32_flops"] else "-"
    print(
        f"{row['device']}: copy {row['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + write); matmul TFLOP/s "
        f"fp32 (no TF32) {row['fp32_flops'] / 1e12:.1f}, tf32 {tf32}, bf16 {row['bf16_flops'] / 1e12:.1f}"
    )


if __name__ == "__main__":
    main()
