"""Bag-of-words encoder: a TF-IDF vector projected by a learned ``EmbeddingBag``.

Weighting, for bag-of-words files and raw text alike (``encoder.weighting``): each entry becomes
``log1p(tf) * w`` with a per-feature weight ``w`` fitted on the training split, then every row is
L2-normalized. ``tfidf`` (the default): ``w = idf = log((1 + N) / (1 + df)) + 1`` (N documents, df of
them holding the feature). ``log1p``: ``w = 1``, PECOS's preprocessing, for features that are already
weighted or where IDF over-weights rare words (Bibtex, dense linear model: +0.4 P@1). Either way
features that never occur in the training split get weight 0: their embedding rows would never
receive a gradient, so they could only add init noise.

Raw text is first turned into counts over a vocabulary of terms built from the training texts: the
lower-cased ``\\w+`` words and, with ``encoder.ngrams=n > 1``, the runs of 2..n consecutive words
(spelled with single spaces, ``"member states"``; scikit-learn's ``ngram_range=(1, n)``). The
vocabulary keeps the ``vocab_size`` terms of highest document frequency with ``df >= min_df``, ties to
the lexicographically smaller term (scikit-learn's ``max_features`` ranks by total count instead), and
is cached in ``$XMC_CACHE/vocab/``. The term-frequency damping is ``log1p(tf)`` (scikit-learn's
``sublinear_tf`` is ``1 + ln tf``: the same shape, shifted).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from xmc.cache import cache_dir, file_checksum, key_of
from xmc.data.atomic import atomic_open
from xmc.encoders.base import Encoder

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
_VOCAB_VERSION = 1  # bump when the tokenization or the selection rule changes
_CHUNK_DOCS = 8192  # documents tokenized at a time: bounds the memory held by Python token lists


def words(text: str) -> list[str]:
    """The word tokens of ``text``: lower-cased runs of Unicode word characters (``\\w+``)."""
    return _WORD.findall(text.lower())


def terms(text: str, ngrams: int = 1) -> list[str]:
    """The words of ``text`` (:func:`words`), then its runs of 2..``ngrams`` consecutive words joined by
    single spaces, each in text order: ``terms("a b c", 2) == ["a", "b", "c", "a b", "b c"]``."""
    tokens = words(text)
    out = list(tokens)
    for n in range(2, ngrams + 1):
        # zip of n shifted views (ragged on purpose: it stops at the shortest), each tuple joined in C
        out.extend(map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False)))
    return out


def ngram_order(vocabulary: Sequence[str]) -> int:
    """The longest n-gram in ``vocabulary`` (1 for words only): what :func:`count_matrix` must emit."""
    return 1 + max((term.count(" ") for term in vocabulary), default=0)


def _chunks(texts: Sequence[str], ngrams: int = 1) -> Iterator[list[list[str]]]:
    for start in range(0, len(texts), _CHUNK_DOCS):
        yield [terms(t, ngrams) for t in texts[start : start + _CHUNK_DOCS]]


def select_vocabulary(texts: Sequence[str], vocab_size: int, min_df: int, ngrams: int = 1) -> list[str]:
    """The ``vocab_size`` terms (words, and n-grams up to ``ngrams`` words; see :func:`terms`) of highest
    document frequency with ``df >= min_df``.

    Words and n-grams compete for the same ``vocab_size`` places. Ties go to the lexicographically
    smaller term, so the result depends on the texts alone. Position in the returned list is the
    feature id.
    """
    if ngrams < 1:
        raise ValueError(f"encoder.ngrams must be at least 1, got {ngrams}")
    df: Counter[str] = Counter()
    for chunk in _chunks(texts, ngrams):
        # Counter.update over an iterable counts in C; one set per document gives document frequency.
        df.update(chain.from_iterable(map(set, chunk)))
    kept = [(count, word) for word, count in df.items() if count >= min_df]
    kept.sort(key=lambda item: (-item[0], item[1]))
    return [word for _, word in kept[:vocab_size]]


def build_vocabulary(
    texts: Callable[[], Sequence[str]],
    sources: Sequence[str | os.PathLike],
    vocab_size: int,
    min_df: int,
    variant: str = "",
    ngrams: int = 1,
) -> list[str]:
    """The training vocabulary (see :func:`select_vocabulary`), from the cache when present.

    Args:
        texts: called only on a cache miss; the training documents.
        sources: the files the texts come from; their checksums key the cache.
        variant: anything else that shapes ``texts``, part of the key.
        ngrams: the longest word n-gram kept (1: words only).
    """
    # ngrams enters the key only above 1, so word vocabularies cached before n-grams stay valid
    key = key_of(
        "bow-vocab",
        _VOCAB_VERSION,
        *(file_checksum(p) for p in sources),
        variant,
        vocab_size,
        min_df,
        _WORD.pattern,
        *((f"ngrams={ngrams}",) if ngrams > 1 else ()),
    )
    path = cache_dir("vocab") / f"{key}.txt"
    if path.exists():
        log.info("vocabulary from cache %s", path)
        # Terms hold no newline (n-grams join words with single spaces), so one per line is unambiguous.
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    vocabulary = select_vocabulary(texts(), vocab_size, min_df, ngrams)
    with atomic_open(path) as handle:
        handle.write("".join(f"{w}\n" for w in vocabulary).encode("utf-8"))
    log.info("vocabulary of %d terms cached in %s", len(vocabulary), path)
    return vocabulary


class _Index(dict):
    """Word -> feature id; unknown words map to -1 without a Python-level ``get`` per token."""

    def __missing__(self, key: str) -> int:
        return -1


def count_matrix(texts: Sequence[str], vocabulary: Sequence[str]) -> sp.csr_matrix:
    """Term counts of ``texts`` over ``vocabulary``: float32 CSR ``(N, len(vocabulary))``.

    The n-gram order comes from the vocabulary itself (:func:`ngram_order`), so a checkpoint's
    vocabulary alone encodes new text. Terms outside the vocabulary are dropped; a document without
    known terms is an empty row. Token lookups run through ``map`` and ``np.fromiter`` (C loops), so
    50k documents take seconds with words; bigrams, with ~1,000 terms a EURLEX document, take minutes.
    """
    index = _Index((w, i) for i, w in enumerate(vocabulary))
    blocks = []
    for chunk in _chunks(texts, ngram_order(vocabulary)):
        lengths = np.fromiter(map(len, chunk), np.int64, len(chunk))
        ids = np.fromiter(map(index.__getitem__, chain.from_iterable(chunk)), np.int64, int(lengths.sum()))
        rows = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)
        known = ids >= 0
        data = np.ones(int(known.sum()), np.float32)
        # COO -> CSR sums the repeated (row, word) pairs into counts.
        block = sp.coo_matrix((data, (rows[known], ids[known])), shape=(len(chunk), len(vocabulary)))
        blocks.append(block.tocsr())
    if not blocks:
        return sp.csr_matrix((0, len(vocabulary)), dtype=np.float32)
    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    X.sort_indices()
    return X


def _canonical(X: sp.spmatrix) -> sp.csr_matrix:
    """A float64 CSR copy without duplicate entries or stored zeros (so df counts are right)."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


def fit_idf(X_train: sp.spmatrix) -> np.ndarray:
    """``idf = log((1 + N) / (1 + df)) + 1`` per feature, float32 ``(F,)``; 0 where ``df == 0``.

    ``X_train``: training features ``(N, F)``; any nonzero counts as an occurrence.
    """
    X = _canonical(X_train)
    n, num_features = X.shape
    df = np.bincount(X.indices, minlength=num_features)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    idf[df == 0] = 0.0
    return idf.astype(np.float32)


WEIGHTINGS = ("tfidf", "log1p")


def fit_weights(X_train: sp.spmatrix, weighting: str = "tfidf") -> np.ndarray:
    """Per-feature weights ``(F,)`` for ``weighting``: :func:`fit_idf`'s IDF (``tfidf``) or 1 for
    every feature seen in training (``log1p``); 0 for features never seen either way."""
    if weighting == "tfidf":
        return fit_idf(X_train)
    if weighting == "log1p":
        return (fit_idf(X_train) > 0).astype(np.float32)
    raise ValueError(f"encoder.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def tfidf(X: sp.spmatrix, idf: np.ndarray) -> sp.csr_matrix:
    """``log1p(tf) * idf`` with L2-normalized rows: float32 CSR ``(N, len(idf))``.

    ``X`` (``(N, F')``, non-negative counts or binary values) may have fewer or more columns than
    ``idf``: missing ones are absent, extra ones (never seen in training) are dropped. Rows
    without any weighted feature stay empty.
    """
    X = _canonical(X)
    if X.nnz and X.data.min() < 0:
        raise ValueError("bag-of-words features must be non-negative (counts, binary or tf values)")
    num_features = len(idf)
    weight = np.zeros(X.shape[1], np.float64)
    shared = min(num_features, X.shape[1])
    weight[:shared] = idf[:shared]
    X.data = np.log1p(X.data) * weight[X.indices]
    X.eliminate_zeros()  # unseen features: keep the bags short
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    norms = np.sqrt(np.bincount(rows, weights=X.data**2, minlength=X.shape[0]))
    X.data /= norms[rows]  # every stored row has a positive norm after eliminate_zeros
    out = sp.csr_matrix(
        (X.data.astype(np.float32), X.indices, X.indptr), shape=(X.shape[0], num_features), copy=False
    )
    out.sort_indices()
    return out


class BowInputs:
    """TF-IDF rows of one split, batched for ``nn.EmbeddingBag``.

    ``batch(rows)`` returns ``bow_indices`` int64 ``(nnz,)``, ``bow_offsets`` int64 ``(B,)`` (where each
    row's bag starts) and ``bow_weights`` float32 ``(nnz,)``.
    """

    def __init__(self, X: sp.csr_matrix) -> None:
        self.X = X.tocsr()

    def __len__(self) -> int:
        return self.X.shape[0]

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        sub = self.X[np.asarray(rows, dtype=np.int64)]
        return {
            "bow_indices": torch.from_numpy(sub.indices.astype(np.int64)),
            "bow_offsets": torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
            "bow_weights": torch.from_numpy(sub.data.astype(np.float32)),
        }


ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class BowEncoder(Encoder):
    """``act(x_tfidf @ W + b)`` through ``nn.EmbeddingBag(mode="sum")``, then dropout; with ``dim=0`` the
    TF-IDF vector itself (no parameters), then dropout.

    Args:
        num_features: F, the width of the TF-IDF vectors.
        dim: output width (``out_features``); 0 for the F-wide TF-IDF vector.
        dropout: dropout probability on the output, applied in training mode.
        activation: ``none`` (a linear, low-rank model with the classifier), ``relu``, ``gelu`` or ``tanh``.

    ``forward`` takes the keys of :class:`BowInputs` and returns float ``(B, dim)``; an empty bag
    gives the bias alone.

    The fitted weighting travels with the weights, so a checkpoint alone can encode new documents
    (:meth:`inputs_for`): ``idf`` is a float32 ``(F,)`` buffer of feature weights (the IDF, or 0/1 under
    ``encoder.weighting=log1p``) and ``vocabulary`` (the training words for raw text, ``None`` for
    bag-of-words files) is saved as the module's extra state.
    """

    def __init__(self, num_features: int, dim: int, dropout: float = 0.0, activation: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if activation != "none" and not dim:
            raise ValueError(
                "an activation needs a projection: set encoder.dim > 0 or encoder.activation=none"
            )
        self.activation = ACTIVATIONS[activation]()
        if dim < 0:
            raise ValueError(f"encoder.dim must be positive, or 0 for the TF-IDF vector itself; got {dim}")
        # dim 0: no projection, the TF-IDF vector is the representation (F wide; the fixed-feature setting,
        # where the classifier alone learns, e.g. fixed fan-in over the raw features).
        self.out_features = dim or num_features
        self.bag = nn.EmbeddingBag(num_features, dim, mode="sum") if dim else None
        self.bias = nn.Parameter(torch.zeros(dim)) if dim else None
        self.dropout = nn.Dropout(dropout)
        # Input rows are L2-normalized, so each output coordinate sum_j x_j W_jk has variance
        # ||x||^2 std^2 = std^2 whatever the document length. std 1 gives unit-variance
        # coordinates, the scale the classifiers' init assumes of their inputs (as for a
        # transformer's hidden states); 1/sqrt(nnz) would only be right for unnormalized counts.
        if self.bag is not None:
            nn.init.normal_(self.bag.weight, mean=0.0, std=1.0)
        self.register_buffer("idf", torch.zeros(num_features))
        self.vocabulary: list[str] | None = None

    def set_weighting(self, idf: np.ndarray, vocabulary: Sequence[str] | None = None) -> None:
        """Remember the fitted feature weights (``(F,)``: IDF, or 0/1 for ``log1p``) and, for raw text,
        the vocabulary (F words)."""
        if len(idf) != self.idf.shape[0] or (vocabulary is not None and len(vocabulary) != len(idf)):
            raise ValueError(f"the weighting must cover the encoder's {self.idf.shape[0]} features")
        self.idf.copy_(torch.from_numpy(np.asarray(idf, np.float32)))
        self.vocabulary = None if vocabulary is None else list(vocabulary)

    def inputs_for(self, X: sp.spmatrix | None = None, texts: Sequence[str] | None = None) -> BowInputs:
        """TF-IDF inputs of new documents, given as counts ``X`` or (raw-text models) ``texts``."""
        idf = self.idf.cpu().numpy()
        if texts is not None:
            if self.vocabulary is None:
                raise ValueError("this bow encoder was trained on bag-of-words features, not raw text")
            X = count_matrix(texts, self.vocabulary)
        if X is None:
            raise ValueError("give X (bag-of-words counts) or texts")
        return BowInputs(tfidf(X, idf))

    def get_extra_state(self) -> dict:
        return {"vocabulary": self.vocabulary}

    def set_extra_state(self, state: dict) -> None:
        self.vocabulary = state.get("vocabulary")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.bag is None:
            return self.dropout(self._tfidf_rows(batch))
        h = self.bag(
            batch["bow_indices"],
            batch["bow_offsets"],
            per_sample_weights=batch["bow_weights"].to(self.bag.weight.dtype),
        )
        return self.dropout(self.activation(h + self.bias))

    def _tfidf_rows(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's TF-IDF vectors as a dense (B, F) float32 tensor."""
        indices, offsets, weights = batch["bow_indices"], batch["bow_offsets"], batch["bow_weights"]
        ends = torch.cat([offsets[1:], offsets.new_tensor([indices.numel()])])
        rows = torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), ends - offsets)
        out = torch.zeros(offsets.numel(), self.out_features, device=weights.device, dtype=torch.float32)
        out[rows, indices] = weights.float()
        return out
