"""What one data split hands to the encoders: its texts, bag-of-words rows or embeddings, and the files
(or text digest) that key the caches built from it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class SplitSource:
    """What one data split provides; exactly the field that fits its format is set.

    Attributes:
        X: bag-of-words features, scipy CSR ``(N, F)`` (counts, binary or tf values), for the
            ``bow`` / ``split`` formats.
        texts: for raw-text formats, a callable returning the ``N`` documents' texts in order;
            called only when a cache (vocabulary, tokenized text) has to be built.
        features: precomputed embeddings ``(N, d)`` float16 / float32, in memory or memory-mapped.
        sources: the files this split was read from; their checksums key the caches.
        variant: anything else that shapes ``texts`` (e.g. which fields were joined), part of the
            cache keys, so that a change re-tokenizes instead of reading a stale cache.
    """

    X: sp.csr_matrix | None = None
    texts: Callable[[], Sequence[str]] | None = None
    features: np.ndarray | None = None
    sources: list[str | os.PathLike] = field(default_factory=list)
    variant: str = ""


def cache_identity(split: SplitSource) -> tuple[list[str | os.PathLike], str]:
    """``(sources, variant)`` that key a raw-text split's caches.

    A split read from files is keyed by the files' checksums. One without files (texts built in
    memory) is keyed by a digest of its texts instead, so two such splits never share a cache entry.
    """
    if split.sources:
        return list(split.sources), split.variant
    if split.texts is None:
        raise ValueError("a split without source files must provide texts")
    digest = hashlib.sha256()
    for text in split.texts():
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return [], f"{split.variant}|texts-sha256:{digest.hexdigest()}"
