"""CPU benchmark: what a FiPS-compressed MiniLM-L6 costs on disk, in memory and in time, against the original.

For each budget (fraction of MiniLM's MLP weights kept; sparsity 0.5, groups of 2 blocks, as the ``fips-*``
rows of ``bench_fips.py``) the bundled MiniLM-L6 is compressed without fitting (SVD pruned once by magnitude:
the factors' values do not change their bytes, memory or time) and saved with
:func:`xmc.compress.fips.save_compressed`. Then each encoder, the original included, is measured in a fresh
process, twice: with glibc's default allocator settings and with a fixed mmap threshold (``MMAP_THRESHOLD``
below), under which the resident peak follows the bytes alive rather than the heap's fragmentation. A
process loads the encoder with :meth:`xmc.encoders.TransformerEncoder.from_pretrained` (the path ``xmc
embed`` and training take) and records its resident memory before loading (the interpreter, PyTorch and
transformers) and after, the peak resident memory of one forward pass (``no_grad``, fp32, ``--batch``
documents of ``--length`` tokens; the peak is reset after loading through ``/proc/self/clear_refs``, Linux
only) and the median time of ``--repeats`` forward passes; each figure is the median over ``--processes``
such processes. The weights of a plain folder are mapped from
its file and become resident as the forward reads them, so compare peaks, not the memory after loading.
FiPS layers rebuild each (r, I) factor densely per forward, or with ``--sparse-products`` multiply by it
as a CSR matrix. Bytes on disk are the weight files (``model.safetensors``, plus ``fips.safetensors``). One
JSON row per encoder and allocator setting goes to ``benchmarks/results/fips_memory.jsonl``.

    python benchmarks/bench_fips_memory.py [--budgets 0.5 0.25] [--batch 32] [--length 128] [--repeats 5]
        [--sparse-products]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_row, git_revision

RESULTS = Path(__file__).parent / "results" / "fips_memory.jsonl"
# glibc serves allocations of at least this many bytes with mmap and returns them to the system when freed,
# so the resident peak follows the bytes alive. Its default threshold grows to the largest block freed
# (up to 32 MiB), after which freed blocks stay in the heap and the peak also counts its fragmentation.
MMAP_THRESHOLD = 65536


def measure(folder: str, batch: int, length: int, repeats: int, sparse: bool) -> dict:
    """Runs in its own process: load, reset the peak, forward passes."""
    import torch

    from xmc.compress.fips import FipsLinear
    from xmc.encoders import TransformerEncoder
    from xmc.runtime import peak_memory, reset_peak_memory, resident_bytes

    FipsLinear.sparse_products = sparse
    torch.manual_seed(0)
    # Before the baseline: the thread pool, and the modules loading imports (the architecture's module,
    # safetensors, accelerate), so the difference is the model's
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import AutoConfig, AutoModel

    torch.ones(64, 64) @ torch.ones(64, 64)
    AutoModel._model_mapping[type(AutoConfig.from_pretrained(folder, local_files_only=True))]
    baseline = resident_bytes()[0]  # the interpreter, PyTorch and transformers, no model
    encoder = TransformerEncoder.from_pretrained(folder).eval()
    vocab = encoder.model.config.vocab_size
    inputs = {
        "input_ids": torch.randint(1000, vocab, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.int64),
    }
    loaded = resident_bytes()[0]
    if not reset_peak_memory(torch.device("cpu")):  # peak resident memory := current
        raise SystemExit("this benchmark resets the resident peak through /proc (Linux 4.0 and later)")
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            encoder(inputs)
            times.append(time.perf_counter() - started)
            if len(times) == 1:
                peak = peak_memory(torch.device("cpu"))[
                    "rss"
                ]  # the first pass: nothing cached from an earlier one
    return {
        "rss_baseline_bytes": baseline,
        "rss_loaded_bytes": loaded,
        "forward_peak_rss_bytes": peak,
        "forward_seconds": statistics.median(times),
    }


def measured(folder, args: argparse.Namespace, threshold: int | None) -> dict:
    """Each measurement of :func:`measure`, its median over ``args.processes`` fresh processes, with
    glibc's mmap threshold fixed at ``threshold`` (None: the default)."""
    command = [sys.executable, __file__, "--measure", str(folder), "--batch", str(args.batch)]
    command += ["--length", str(args.length), "--repeats", str(args.repeats)]
    command += ["--sparse-products"] if args.sparse_products else []
    env = {**os.environ}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    runs = []
    for _ in range(args.processes):
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--processes", type=int, default=3, help="fresh processes per encoder and setting (medians kept)"
    )
    parser.add_argument(
        "--sparse-products",
        action="store_true",
        help="FiPS layers multiply by their CSR factors (FipsLinear.sparse_products), not rebuilding them",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one encoder in this process
    parser.add_argument("--no-save", action="store_true", help="print the rows, do not append them")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch, args.length, args.repeats, args.sparse_products)))
        return

    import torch
    import transformers

    from xmc.compress.fips import describe, save_compressed
    from xmc.compress.fit import compress_mlps
    from xmc.encoders import load_tokenizer, resolve_model_path

    source = resolve_model_path("minilm")
    with tempfile.TemporaryDirectory() as scratch:
        encoders = {"minilm": (source, ["model.safetensors"], None)}
        for budget in args.budgets:
            model = transformers.AutoModel.from_pretrained(str(source), local_files_only=True).float()
            report = compress_mlps(model, None, args.sparsity, budget=budget, steps=0, progress=False)
            folder = Path(scratch) / f"fips-{budget:g}"
            save_compressed(model, load_tokenizer(source), folder, {"source": "minilm", **report})
            encoders[f"fips-{budget:g}"] = (
                folder,
                ["model.safetensors", "fips.safetensors"],
                describe(model),
            )
        for name, (folder, files, summary) in encoders.items():
            for threshold in (None, MMAP_THRESHOLD):
                row = {
                    "bench": "fips_memory",
                    "encoder": name,
                    "disk_bytes": sum((Path(folder) / f).stat().st_size for f in files),
                    "malloc_mmap_threshold": threshold,  # None: glibc's default (dynamic) threshold
                    **measured(folder, args, threshold),
                    "processes": args.processes,
                    "batch": args.batch,
                    "length": args.length,
                    "sparsity": None if summary is None else args.sparsity,
                    "sparse_products": None if summary is None else args.sparse_products,
                    "mlp_weight_fraction": 1.0
                    if summary is None
                    else round(summary["mlp_weight_fraction"], 4),
                    "device": "CPU",
                    "threads": torch.get_num_threads(),
                    "load_average": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "git": git_revision(),
                    "date": time.strftime("%Y-%m-%d"),
                }
                if args.no_save:
                    print(json.dumps(row))
                else:
                    append_row(RESULTS, row)


if __name__ == "__main__":
    main()
