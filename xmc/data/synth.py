"""Synthetic XMC datasets for scale tests, with power-law label frequencies and a learnable signal.

Labels. Rank the L labels by frequency (rank r = 1 most frequent). Label r joins each document
independently with probability ``q_r = c * r**-a``, where ``c = m / sum_r r**-a`` makes the expected
number of labels per document exactly ``m``; so the expected count of rank r is ``N * q_r``, a power
law of exponent ``a``. Per label we draw its count ``n_r ~ Binomial(N, q_r)`` and then ``n_r``
distinct documents uniformly, vectorized over labels (never an N x L array): labels with large
``q_r`` take one Bernoulli draw per document; the rest draw documents with replacement and redraw
duplicates until none remain (symmetric in the documents, hence a uniform subset). A seeded
permutation maps rank to label id, so the id says nothing about the frequency.

Features. Label l has a signature of ``s`` word ids, ``hash(seed, l, j) % F`` for j < s (nothing
stored: any label's signature is computed on demand). A document holds ``k`` words drawn from the
signature of each of its labels plus ``Poisson(noise)`` background words, Zipf-distributed over the
vocabulary. Bag-of-words values are sublinear term frequencies ``1 + log(count)``, L2-normalized
per document and rounded to 4 decimals (smaller files); LF JSON text is the same words ("w123")
in a random order, the first few as the title and the rest as the content.

Memory is O(N * m + L + F + chunk): documents are generated and written in fixed-size chunks, and
every random draw comes from a stream keyed by (seed, purpose, split, chunk), so equal options
give byte-identical files on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from xmc import __version__
from xmc.data.atomic import atomic_open
from xmc.data.bow import BowWriter
from xmc.progress import bars

SYNTH_FORMATS = ("bow", "lf-json", "both")

# Fixed, never machine-dependent: chunk boundaries key the random streams, so changing this
# constant changes the output.
_CHUNK_DOCS = 20_000
_LABEL_CHUNK = 50_000  # labels per batch of lbl.json.gz lines
# Labels at least this likely take one Bernoulli draw per document; below it, sampling with
# replacement rarely collides (about q / 2 of the draws per round), so redrawing converges fast.
_BERNOULLI_Q = 0.05
_NOISE_ZIPF = 1.0  # background word id j has probability proportional to (j + 1) ** -1
_TITLE_WORDS = 8  # LF JSON: the first words of a document form its title
_DECIMALS = 4  # bag-of-words values are rounded to this many decimals
_PURPOSE = {"labels": 0, "permutation": 1, "signatures": 2, "tokens": 3, "order": 4}
_SPLITS = (("train", "train.txt", "trn.json.gz", "trn"), ("test", "test.txt", "tst.json.gz", "tst"))


@dataclass(frozen=True)
class SynthOptions:
    """What to generate. Defaults give a mid-sized set (10k labels, 50k + 10k documents)."""

    num_labels: int = 10_000  # L; millions are fine: memory grows with L only as O(L) floats
    num_train: int = 50_000  # training documents
    num_test: int = 10_000  # test documents (0 allowed), drawn from the same distribution
    labels_per_doc: float = 5.0  # m, the expected labels per document; with exponent, bounded by q_1 <= 1
    exponent: float = 1.0  # a, power-law exponent of label frequency vs rank; larger = longer tail
    num_features: int = 50_000  # F, vocabulary size; smaller = more signature collisions between labels
    seed: int = 0
    format: str = "bow"  # "bow" (train.txt, test.txt), "lf-json" (trn/tst/lbl.json.gz) or "both"
    signature_size: int = 10  # s, words per label signature; smaller = each label easier to spot
    words_per_label: int = 4  # k, signature words drawn per (document, label); more = stronger signal
    noise_words: float = 20.0  # mean background words per document; more = weaker signal, bigger files

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise ``ValueError`` naming the first bad option; ``names`` maps field names to the
        names the caller shows (e.g. command-line flags)."""
        names = names or {}

        def show(key: str) -> str:
            return names.get(key, key)

        at_least = {"num_labels": 1, "num_train": 1, "num_test": 0, "num_features": 1, "seed": 0}
        at_least |= {"signature_size": 1, "words_per_label": 1}
        for key, low in at_least.items():
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{show(key)} must be an integer >= {low}, got {value!r}")
        for key in ("num_labels", "num_features"):
            if getattr(self, key) >= 2**31:
                raise ValueError(f"{show(key)} must be below 2**31 (ids are int32), got {getattr(self, key)}")
        for key, low, strict in (("labels_per_doc", 0.0, True), ("exponent", 0.0, False)):
            value = getattr(self, key)
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ValueError(
                    f"{show(key)} must be a finite number {'>' if strict else '>='} {low}, got {value}"
                )
        if not math.isfinite(self.noise_words) or self.noise_words < 0:
            raise ValueError(f"{show('noise_words')} must be a finite number >= 0, got {self.noise_words}")
        if self.format not in SYNTH_FORMATS:
            raise ValueError(
                f"{show('format')} must be one of {', '.join(SYNTH_FORMATS)}, got {self.format!r}"
            )
        inclusion_probabilities(self.num_labels, self.labels_per_doc, self.exponent, names)


@dataclass
class SynthResult:
    """What :func:`synthesize` wrote: file paths and per-split counts."""

    out: str
    files: list[str] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)
    label_assignments: dict[str, int] = field(default_factory=dict)  # nonzeros of Y per split
    max_probability: float = 0.0  # q_1, the share of documents expected to carry the top label
    seconds: float = 0.0


def inclusion_probabilities(
    num_labels: int, labels_per_doc: float, exponent: float, names: Mapping[str, str] | None = None
) -> np.ndarray:
    """``q`` float64 ``(L,)``: the probability that the label of frequency rank ``r + 1`` joins a
    document, ``c * (r + 1) ** -exponent`` with ``sum(q) == labels_per_doc``.

    Raises ``ValueError`` when that needs ``q_1 > 1``, saying how far to lower ``labels_per_doc``
    or ``exponent``; ``names`` renames those in the message (e.g. to command-line flags).
    """
    names = names or {}
    m_name, a_name = names.get("labels_per_doc", "labels_per_doc"), names.get("exponent", "exponent")
    if labels_per_doc > num_labels:
        raise ValueError(
            f"{m_name}={labels_per_doc:g} exceeds the {num_labels} labels; "
            f"lower {m_name} to at most {num_labels}"
        )
    weights = np.arange(1, num_labels + 1, dtype=np.float64) ** -exponent
    scale = labels_per_doc / weights.sum()
    if scale > 1.0:
        # The largest exponent with sum_r r**-a >= m, by bisection (the sum falls as a grows).
        low, high = 0.0, exponent
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if _power_sum(num_labels, mid) >= labels_per_doc else (low, mid)
        raise ValueError(
            f"{m_name}={labels_per_doc:g} with {a_name}={exponent:g} over {num_labels} labels would put the "
            f"most frequent label in {scale:.0%} of documents (more than all of them); lower {m_name} "
            f"to at most {math.floor(weights.sum() * 100) / 100:g} or {a_name} to at most "
            f"{math.floor(low * 100) / 100:g}"
        )
    return scale * weights


def _power_sum(n: int, exponent: float) -> float:
    """``sum_{r=1..n} r**-exponent``: exact over the first 10**5 terms, midpoint integral beyond."""
    head = min(n, 100_000)
    total = float((np.arange(1, head + 1, dtype=np.float64) ** -exponent).sum())
    if n > head:
        lo, hi = head + 0.5, n + 0.5
        if abs(exponent - 1.0) < 1e-12:
            total += math.log(hi / lo)
        else:
            total += (hi ** (1 - exponent) - lo ** (1 - exponent)) / (1 - exponent)
    return total


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one purpose (and split, chunk): streams never overlap."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def sample_label_assignment(
    q: np.ndarray, num_docs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw which documents carry each label rank: rank ``r`` goes to a uniform subset of
    ``Binomial(num_docs, q[r])`` distinct documents.

    Returns ``(ranks, docs)``, int64 arrays of equal length ``~ num_docs * sum(q)``, one entry per
    (document, label rank) pair, without repeats. Memory is O(pairs) plus O(num_docs) transiently.
    """
    num_head = int(np.count_nonzero(q >= _BERNOULLI_Q))  # q falls with rank: the head is a prefix
    ranks, docs = [], []
    for rank in range(num_head):
        chosen = np.flatnonzero(rng.random(num_docs) < q[rank])
        ranks.append(np.full(len(chosen), rank, np.int64))
        docs.append(chosen.astype(np.int64))
    counts = rng.binomial(num_docs, q[num_head:])
    tail = np.repeat(np.arange(num_head, len(q), dtype=np.int64), counts)
    keys = tail * num_docs + rng.integers(0, num_docs, len(tail))
    while True:
        keys.sort()
        repeated = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if len(repeated) == 0:
            break
        keys[repeated] = keys[repeated] // num_docs * num_docs + rng.integers(0, num_docs, len(repeated))
    ranks.append(keys // num_docs)
    docs.append(keys % num_docs)
    return np.concatenate(ranks), np.concatenate(docs)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64's finalizer); uint64 arithmetic wraps on purpose."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def signature_words(labels: np.ndarray, positions: np.ndarray, options: SynthOptions) -> np.ndarray:
    """Word ids int64 (same shape as ``labels``): position ``positions[i]`` (< signature_size) of
    the signature of label ``labels[i]``. A pure function of the seed, so nothing is stored."""
    key = np.random.SeedSequence(options.seed, spawn_key=(_PURPOSE["signatures"],)).generate_state(
        1, np.uint64
    )
    slot = labels.astype(np.uint64) * np.uint64(options.signature_size) + positions.astype(np.uint64)
    return (_splitmix64(slot ^ key[0]) % np.uint64(options.num_features)).astype(np.int64)


def _chunk_words(
    indptr: np.ndarray, labels: np.ndarray, options: SynthOptions, cdf: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Words of the documents of one chunk: ``(doc, word)`` int64 pairs, one per token, where
    ``indptr`` (n + 1,) and ``labels`` are the chunk's rows of Y in CSR form."""
    n = len(indptr) - 1
    k = options.words_per_label
    pair_doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    sig_labels = np.repeat(labels, k)
    sig_words = signature_words(sig_labels, rng.integers(0, options.signature_size, len(sig_labels)), options)
    noise_counts = rng.poisson(options.noise_words, n)
    noise_doc = np.repeat(np.arange(n, dtype=np.int64), noise_counts)
    noise_words = np.searchsorted(cdf, rng.random(len(noise_doc)), side="right")
    noise_words = np.minimum(noise_words, options.num_features - 1)  # cdf[-1] may round below 1
    return np.concatenate([np.repeat(pair_doc, k), noise_doc]), np.concatenate([sig_words, noise_words])


def _bow_features(doc: np.ndarray, word: np.ndarray, num_docs: int, num_features: int) -> sp.csr_matrix:
    """X float32 CSR ``(num_docs, num_features)``: ``1 + log(count)``, unit L2 norm per row."""
    X = sp.csr_matrix((np.ones(len(doc)), (doc, word)), shape=(num_docs, num_features), dtype=np.float64)
    X.sum_duplicates()  # counts per (document, word), ids sorted within rows
    values = 1.0 + np.log(X.data)
    row = np.repeat(np.arange(num_docs), np.diff(X.indptr))
    values /= np.sqrt(np.bincount(row, weights=values**2, minlength=num_docs))[row]
    X.data = np.round(values, _DECIMALS).astype(np.float32)
    return X


def _json_lines(doc, word, indptr, labels, first: int, prefix: str, rng: np.random.Generator) -> bytes:
    """LF JSON lines of one chunk (arrays as in :func:`_chunk_words`; uids ``prefix + first + i``);
    words of each document in a random order, the first ``_TITLE_WORDS`` as its title.

    Lines are formatted by hand, byte for byte as ``json.dumps`` would, because every string is
    made of ASCII letters, digits and spaces (nothing to escape) and this is several times faster.
    """
    n = len(indptr) - 1
    order = np.lexsort((rng.random(len(doc)), doc))  # group by document, shuffle within
    words = [f"w{w}" for w in word[order].tolist()]
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(doc, minlength=n), out=starts[1:])
    starts, indptr, labels = starts.tolist(), indptr.tolist(), labels.astype(str).tolist()
    lines = []
    for i in range(n):
        text = words[starts[i] : starts[i + 1]]
        title, content = " ".join(text[:_TITLE_WORDS]), " ".join(text[_TITLE_WORDS:])
        target = ", ".join(labels[indptr[i] : indptr[i + 1]])
        lines.append(
            f'{{"uid": "{prefix}{first + i}", "title": "{title}", "content": "{content}", '
            f'"target_ind": [{target}]}}\n'
        )
    return "".join(lines).encode()


def _write_label_file(path: str, options: SynthOptions) -> None:
    """``lbl.json.gz``: per label its uid ``L<id>`` and its signature words as the title
    (formatted by hand like :func:`_json_lines`)."""
    s = options.signature_size
    with atomic_open(path) as handle:
        for start in range(0, options.num_labels, _LABEL_CHUNK):
            ids = np.arange(start, min(start + _LABEL_CHUNK, options.num_labels), dtype=np.int64)
            words = signature_words(np.repeat(ids, s), np.tile(np.arange(s), len(ids)), options)
            words = words.astype(str).tolist()
            lines = [
                f'{{"uid": "L{label}", "title": "w{" w".join(words[j * s : (j + 1) * s])}"}}\n'
                for j, label in enumerate(ids.tolist())
            ]
            handle.write("".join(lines).encode())


def _label_rows(options: SynthOptions) -> tuple[np.ndarray, np.ndarray, float]:
    """Y of all documents (train then test) in CSR form: ``indptr`` int64 (N + 1,), ``labels``
    int32 sorted within rows; and ``q_1``."""
    num_docs = options.num_train + options.num_test
    q = inclusion_probabilities(options.num_labels, options.labels_per_doc, options.exponent)
    ranks, docs = sample_label_assignment(q, num_docs, _rng(options.seed, _PURPOSE["labels"]))
    label_of_rank = _rng(options.seed, _PURPOSE["permutation"]).permutation(options.num_labels)
    keys = docs * options.num_labels + label_of_rank[ranks]
    del ranks, docs
    keys.sort()
    indptr = np.zeros(num_docs + 1, np.int64)
    np.cumsum(np.bincount(keys // options.num_labels, minlength=num_docs), out=indptr[1:])
    return indptr, (keys % options.num_labels).astype(np.int32), float(q[0])


def synthesize(
    out: str | os.PathLike, options: SynthOptions | None = None, *, progress: bool = True
) -> SynthResult:
    """Write a synthetic dataset into the folder ``out`` (created if needed) and return what was written.

    Files: ``train.txt`` / ``test.txt`` (bag-of-words, readable by :func:`xmc.data.read_bow`) for
    format ``bow``; ``trn.json.gz`` / ``tst.json.gz`` / ``lbl.json.gz`` for ``lf-json``; all five
    for ``both`` (the same documents in both forms); test files only when ``num_test > 0``; always
    ``synth.json`` with the options and counts. Each file appears atomically. Raises ``ValueError``
    for invalid options (see :meth:`SynthOptions.validate`). A tqdm bar shows progress when
    ``progress`` is true and stderr is a TTY.
    """
    options = options or SynthOptions()
    options.validate()
    began = time.perf_counter()
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    result = SynthResult(out=out)
    bow = options.format in ("bow", "both")
    lf = options.format in ("lf-json", "both")
    indptr, labels, result.max_probability = _label_rows(options)
    cdf = np.cumsum(np.arange(1, options.num_features + 1, dtype=np.float64) ** -_NOISE_ZIPF)
    cdf /= cdf[-1]  # background words: inverse-CDF sampling of the Zipf distribution
    if lf:
        _write_label_file(os.path.join(out, "lbl.json.gz"), options)
        result.files.append("lbl.json.gz")
    total = options.num_train + options.num_test
    with tqdm(total=total, unit="doc", desc="synth", disable=not bars(progress)) as bar:
        offset = 0
        for split_id, (split, bow_name, lf_name, prefix) in enumerate(_SPLITS):
            num_docs = options.num_train if split == "train" else options.num_test
            rows = indptr[offset : offset + num_docs + 1]
            result.documents[split] = num_docs
            result.label_assignments[split] = int(rows[-1] - rows[0])
            offset += num_docs
            if num_docs == 0:
                continue  # no test files at all: an empty JSON lines file is not a valid LF file
            names = (bow_name if bow else None, lf_name if lf else None)
            _write_split(out, names, rows, labels, options, cdf, split_id, prefix, bar)
            result.files += [name for name in names if name]
    _write_manifest(out, options, result)
    result.files.append("synth.json")
    result.seconds = time.perf_counter() - began
    return result


def _write_split(
    out: str,
    names: tuple[str | None, str | None],
    rows: np.ndarray,
    labels: np.ndarray,
    options: SynthOptions,
    cdf: np.ndarray,
    split_id: int,
    prefix: str,
    bar: tqdm,
) -> None:
    """Generate and write one split chunk by chunk; ``names`` = (bag-of-words file, LF JSON file),
    ``None`` for a format not asked for; ``rows`` (n + 1,) slices ``labels`` into documents."""
    num_docs = len(rows) - 1
    bow_name, lf_name = names
    with contextlib.ExitStack() as stack:
        # ExitStack closes both writers even when one fails, so no temporary file is left behind.
        bow_writer = lf_handle = None
        if bow_name:
            shape = (num_docs, options.num_features, options.num_labels)
            bow_writer = stack.enter_context(BowWriter(os.path.join(out, bow_name), *shape))
        if lf_name:
            lf_handle = stack.enter_context(atomic_open(os.path.join(out, lf_name)))
        for chunk, start in enumerate(range(0, num_docs, _CHUNK_DOCS)):
            stop = min(start + _CHUNK_DOCS, num_docs)
            chunk_ptr = rows[start : stop + 1] - rows[start]
            chunk_labels = labels[rows[start] : rows[stop]]
            key = (split_id, chunk)
            token_rng = _rng(options.seed, _PURPOSE["tokens"], *key)
            doc, word = _chunk_words(chunk_ptr, chunk_labels, options, cdf, token_rng)
            if bow_writer is not None:
                X = _bow_features(doc, word, stop - start, options.num_features)
                Y = sp.csr_matrix(
                    (np.ones(len(chunk_labels), np.float32), chunk_labels, chunk_ptr),
                    shape=(stop - start, options.num_labels),
                )
                bow_writer.write(X, Y)
            if lf_handle is not None:
                # Its own stream, so the bag-of-words output is the same whether or not text is written.
                order_rng = _rng(options.seed, _PURPOSE["order"], *key)
                lf_handle.write(_json_lines(doc, word, chunk_ptr, chunk_labels, start, prefix, order_rng))
            bar.update(stop - start)


def _write_manifest(out: str, options: SynthOptions, result: SynthResult) -> None:
    """``synth.json``: the options and counts, so a dataset says how to make it again."""
    manifest = {
        "generator": "xmc data synth",
        "xmc_version": __version__,
        "options": dataclasses.asdict(options),
        "max_label_probability": result.max_probability,
        "files": result.files,
        "documents": result.documents,
        "label_assignments": result.label_assignments,
    }
    with atomic_open(os.path.join(out, "synth.json")) as handle:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode())
