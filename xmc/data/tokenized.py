"""Tokenized-text cache: tokenize a split once, memory-map it on every later run.

Token ids are stored unpadded (``input_ids``: one int32 list per document) in an Arrow file under
``$XMC_CACHE/tokenized/``, loaded with ``datasets`` as a memory-mapped :class:`datasets.Dataset`, so
a second run neither tokenizes again nor holds the corpus in RAM. The cache key covers everything that
changes the ids: the source files' checksums, which text fields were used, the tokenizer (its full
serialized definition, not just its name) and the maximum length. A changed file gets a new key and
is re-tokenized; stale entries are never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from xmc.cache import cache_dir, file_checksum, key_of
from xmc.data.atomic import atomic_open
from xmc.progress import bars

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_BATCH_DOCS = 2048  # documents per tokenizer call and per Arrow record batch
_LAYOUT_VERSION = 1  # bump when the stored columns change


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
) -> datasets.Dataset:
    """The tokenized split, from the cache when present.

    Args:
        texts: called only on a cache miss; returns the documents' texts in order.
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length in tokens (special tokens included).
        sources: the files the texts come from; their checksums key the cache.
        variant: anything else that shapes ``texts`` (e.g. which fields were joined), part of the key.

    Returns:
        A memory-mapped ``datasets.Dataset`` with one column ``input_ids`` (list of int32 per
        document, unpadded, at most ``max_length`` long).
    """
    import datasets

    key = key_of(
        "tokenized",
        _LAYOUT_VERSION,
        *(file_checksum(p) for p in sources),
        variant,
        tokenizer_fingerprint(tokenizer),
        max_length,
    )
    path = cache_dir("tokenized") / f"{key}.arrow"
    if path.exists():
        log.info("tokenized text from cache %s", path)
        return datasets.Dataset.from_file(str(path))
    _write_arrow(path, texts(), tokenizer, max_length, progress)
    return datasets.Dataset.from_file(str(path))


def _write_arrow(path, texts: Sequence[str], tokenizer, max_length: int, progress: bool) -> None:
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])
    bar = tqdm(total=len(texts), desc="tokenizing", unit="doc", disable=not bars(progress), leave=False)
    with atomic_open(path) as handle, pa.ipc.new_stream(handle, schema) as writer:
        for start in range(0, len(texts), _BATCH_DOCS):
            batch = list(texts[start : start + _BATCH_DOCS])
            ids = tokenizer(batch, truncation=True, max_length=max_length, add_special_tokens=True)[
                "input_ids"
            ]
            writer.write_batch(pa.record_batch([pa.array(ids, type=pa.list_(pa.int32()))], schema=schema))
            bar.update(len(batch))
    bar.close()
    log.info("tokenized %d documents into %s", len(texts), path)
