"""Tokenized-text cache: tokenize a split once, in parallel, and memory-map it on every later run.

Tokenization is ``datasets.Dataset.map(batched=True, num_proc=N)``: the documents are split into N
contiguous shards, each tokenized in its own process into an Arrow file (token ids unpadded,
``input_ids``: one int32 list per document), and the shards are read back as one memory-mapped
:class:`datasets.Dataset`, so a second run neither tokenizes again nor holds the corpus in RAM.

The cache lives under ``$XMC_CACHE/tokenized/<key>/``. The key (also the ``map`` fingerprint) covers
everything that changes the ids: the source files' checksums, which text fields were used, the
tokenizer (its full serialized definition, not just its name) and the maximum length. A changed file
gets a new key and is re-tokenized; stale entries are never read. ``map`` writes into a temporary
folder beside it, renamed to ``<key>`` only once every shard is complete: an interrupted run (Ctrl-C,
a killed worker) leaves at most a ``.partial`` folder, which is never read and is removed by the next
run that tokenizes the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xmc.cache import cache_dir, file_checksum, key_of
from xmc.progress import bars

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_BATCH_DOCS = 1024  # documents per tokenizer call (and per Arrow record batch)
_MIN_DOCS_PER_PROC = 4 * _BATCH_DOCS  # fewer documents per process would cost more in start-up than they save
_LAYOUT_VERSION = 2  # bump when the stored columns or files change (2: a folder of map() shards)
NUM_PROC_ENV = "XMC_TOKENIZE_PROCS"  # processes that tokenize (default: the CPU cores this process may use)


def default_num_proc() -> int:
    """``$XMC_TOKENIZE_PROCS``, else the cores this process may run on."""
    if os.environ.get(NUM_PROC_ENV):
        return max(1, int(os.environ[NUM_PROC_ENV]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides the tokenizer's output.

    Fast tokenizers serialize their whole pipeline (normalizer, pre-tokenizer, vocabulary, ...); for
    others the class, vocabulary and lower-casing flag stand in.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Truncation and padding are per-call settings that the backend remembers; the cache key
        # holds max_length itself.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        text = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'do_lower_case', None)}|{vocab}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenize_cached(
    texts: Callable[[], Sequence[str]],
    tokenizer,
    max_length: int,
    sources: Sequence[str | os.PathLike],
    variant: str = "",
    progress: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """The tokenized split, from the cache when present.

    Args:
        texts: called only on a cache miss; returns the documents' texts in order.
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length in tokens (special tokens included).
        sources: the files the texts come from; their checksums key the cache.
        variant: anything else that shapes ``texts`` (e.g. which fields were joined), part of the key.
        num_proc: processes that tokenize on a miss (default :func:`default_num_proc`; fewer when the
            split is small). The ids do not depend on it, and neither does the key.

    Returns:
        A memory-mapped ``datasets.Dataset`` with one column ``input_ids`` (list of int32 per
        document, unpadded, at most ``max_length`` long).
    """
    key = key_of(
        "tokenized",
        _LAYOUT_VERSION,
        *(file_checksum(p) for p in sources),
        variant,
        tokenizer_fingerprint(tokenizer),
        max_length,
    )
    folder = cache_dir("tokenized") / key
    if folder.is_dir():
        log.info("tokenized text from cache %s", folder)
        return _load(folder)
    _tokenize_into(folder, key, texts(), tokenizer, max_length, num_proc or default_num_proc(), progress)
    return _load(folder)


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a folder-name suffix) still runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _load(folder: Path) -> datasets.Dataset:
    """The shards of a complete cache folder, in order, as one memory-mapped dataset."""
    import datasets

    shards = [datasets.Dataset.from_file(str(p)) for p in sorted(folder.glob("ids*.arrow"))]
    return shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)


def _tokenize_into(
    folder: Path, key: str, texts: Sequence[str], tokenizer, max_length: int, num_proc: int, progress: bool
) -> None:
    """Tokenize ``texts`` with ``Dataset.map`` over ``num_proc`` processes into ``folder`` (atomically)."""
    import datasets

    for stale in folder.parent.glob(f"{key}.partial-*"):  # left by an interrupted run (not a live one)
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    procs = max(1, min(num_proc, math.ceil(len(texts) / _MIN_DOCS_PER_PROC)))
    partial = folder.parent / f"{key}.partial-{os.getpid()}"
    partial.mkdir()
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 names it List
    features = datasets.Features({"input_ids": list_of(datasets.Value("int32"))})

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length, add_special_tokens=True)
        return {"input_ids": ids["input_ids"]}

    try:
        with _progress_bars(bars(progress)):
            raw = datasets.Dataset.from_dict({"text": list(texts)})
            raw.map(
                encode,
                batched=True,
                batch_size=_BATCH_DOCS,
                num_proc=procs if procs > 1 else None,
                remove_columns=["text"],
                features=features,
                cache_file_name=str(partial / "ids.arrow"),  # shards: ids_00000_of_00002.arrow, ...
                new_fingerprint=key,
                desc="tokenizing",
            )
        try:
            os.replace(partial, folder)  # the folder appears whole, or not at all
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(partial)  # another run finished the same key first; both are whole and equal
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("tokenized %d documents with %d process(es) into %s", len(texts), procs, folder)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """``datasets``' progress bars on or off inside, as before outside."""
    import datasets

    before = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()
