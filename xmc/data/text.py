"""Raw-text datasets: the repository's ``LF-*`` JSON lines and ``*_texts.txt`` + ``*_labels.txt`` pairs.

LF JSON lines hold one record per document: ``uid``, ``title``, ``content`` and ``target_ind`` (label
ids indexing the lines of the label file ``lbl.json(.gz)``), optionally ``target_rel``. The LF sets
also ship ``filter_labels_{train,test}.txt``: ``doc label`` pairs to drop before scoring.

Text pairs (AttentionXML / LightXML style) hold one document per line in ``*_texts.txt`` and its
space-separated label names on the same line of ``*_labels.txt``; names map to ids through a label
vocabulary built from all given splits (sorted, cached) or supplied by the user.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from xmc.cache import cache_dir, file_checksum, key_of
from xmc.data.atomic import atomic_open
from xmc.data.errors import FormatError
from xmc.data.sparse_text import read_lines_bytes


@dataclass
class TextDataset:
    """Documents with raw text and labels.

    ``Y`` is float32 CSR ``(N, L)`` with ones; ``relevance`` (same pattern as ``Y``) holds
    ``target_rel`` where the source had it.
    """

    uids: list[str]
    titles: list[str]
    contents: list[str]
    Y: sp.csr_matrix
    label_names: list[str] | None = None
    relevance: sp.csr_matrix | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.uids)

    def texts(self, fields: Sequence[str] = ("title", "content"), sep: str = "\n") -> list[str]:
        """One string per document: the chosen fields joined by ``sep`` (empty fields left out)."""
        columns = [{"title": self.titles, "content": self.contents}[f] for f in fields]
        return [sep.join(part for part in parts if part) for parts in zip(*columns, strict=True)]


def decode_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (gz allowed, BOM and CRLF handled), split on newlines only."""
    data = read_lines_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise FormatError(path, line, f"not valid UTF-8 ({err.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def json_records(path: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every line of a JSON-lines file; FormatError for a bad line."""
    lines = decode_lines(path)
    if not lines:
        raise FormatError(path, 1, "empty file: expected one JSON object per line")
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(path, number, f"not a JSON object ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise FormatError(path, number, f"expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def read_lf_json(
    path: str | os.PathLike, num_labels: int | None = None, label_file: str | os.PathLike | None = None
) -> TextDataset:
    """Read LF-style JSON lines (``.json`` or ``.json.gz``).

    The label count ``L`` comes from ``label_file`` (one line per label) when given, else from
    ``num_labels``, else from the largest id seen (+1): pass one of the first two so that train and
    test agree. Raises :class:`FormatError` for a line that is not JSON, a record without
    ``target_ind``, an id out of range, a duplicate id, or a ``target_rel`` of the wrong length.
    """
    path = os.fspath(path)
    names = None
    if label_file is not None:
        names = read_label_names(label_file)
        num_labels = len(names)
    uids, titles, contents, rows, rels = [], [], [], [], []
    has_rel = False
    for number, record in json_records(path):
        if "target_ind" not in record:
            raise FormatError(path, number, "record has no 'target_ind' (its list of label ids)")
        ids = record["target_ind"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise FormatError(path, number, f"'target_ind' must be a list of integers, got {str(ids)[:60]}")
        _check_ids(path, number, ids, num_labels, label_file)
        if "target_rel" in record:
            has_rel = True
            rel = record["target_rel"]
            if not isinstance(rel, list) or len(rel) != len(ids):
                raise FormatError(path, number, "'target_rel' must be a list as long as 'target_ind'")
            rels.append(rel)
        else:
            rels.append([1.0] * len(ids))
        for key in ("title", "content"):
            if not isinstance(record.get(key, ""), str):
                raise FormatError(path, number, f"'{key}' must be a string")
        uids.append(str(record.get("uid", number - 1)))
        titles.append(record.get("title", ""))
        contents.append(record.get("content", ""))
        rows.append(ids)
    if num_labels is None:
        num_labels = 1 + max((max(r) for r in rows if r), default=-1)
    Y = _rows_to_csr(rows, num_labels)
    relevance = None
    if has_rel:
        relevance = _rows_to_csr(rows, num_labels, [np.float32(v) for r in rels for v in r])
    return TextDataset(uids, titles, contents, Y, names, relevance)


def _check_ids(path: str, number: int, ids: list[int], num_labels: int | None, label_file) -> None:
    if len(set(ids)) != len(ids):
        raise FormatError(path, number, f"duplicate label id in 'target_ind' {ids[:20]}")
    for i in ids:
        if i < 0:
            raise FormatError(path, number, f"negative label id {i} in 'target_ind'")
        if num_labels is not None and i >= num_labels:
            source = f"the label file {os.fspath(label_file)}" if label_file else "num_labels"
            raise FormatError(
                path,
                number,
                f"label id {i} out of range: {source} gives {num_labels} labels (ids 0..{num_labels - 1})",
            )


def _rows_to_csr(rows: list[list[int]], num_labels: int, values: list | None = None) -> sp.csr_matrix:
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    ids = np.fromiter((i for r in rows for i in r), np.int32, int(indptr[-1]))
    data = np.ones(len(ids), np.float32) if values is None else np.asarray(values, np.float32)
    Y = sp.csr_matrix((data, ids, indptr.astype(np.int32)), shape=(len(rows), num_labels))
    Y.sort_indices()
    return Y


def write_lf_json(path: str | os.PathLike, dataset: TextDataset) -> None:
    """Write ``dataset`` as LF JSON lines (gzip when ``path`` ends in ``.gz``), atomically."""
    Y = dataset.Y.tocsr()
    with atomic_open(path) as handle:
        for i, uid in enumerate(dataset.uids):
            ids = Y.indices[Y.indptr[i] : Y.indptr[i + 1]].tolist()
            record = {
                "uid": uid,
                "title": dataset.titles[i],
                "content": dataset.contents[i],
                "target_ind": ids,
            }
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def read_label_names(path: str | os.PathLike, field: str = "title") -> list[str]:
    """Label names, one per label id: ``field`` (``title`` or ``uid``) of each line of
    ``lbl.json(.gz)``, falling back to the other key where it is missing, or the lines of a plain
    text file (e.g. ``Yf.txt``, ``labels.txt``)."""
    path = os.fspath(path)
    if path.endswith((".json", ".json.gz")):
        other = "uid" if field == "title" else "title"
        names = []
        for number, record in json_records(path):
            name = record.get(field, record.get(other))
            if name is None:
                raise FormatError(path, number, "label record has neither 'title' nor 'uid'")
            names.append(str(name).strip())
        return names
    lines = decode_lines(path)
    if not lines:
        raise FormatError(path, 1, "empty file: expected one label name per line")
    return lines


def write_label_names(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Write ``lbl.json(.gz)`` lines (``uid`` = ``title`` = name) or, for other paths, one name per line."""
    path = os.fspath(path)
    with atomic_open(path) as handle:
        for name in names:
            line = json.dumps({"uid": name, "title": name}) if path.endswith((".json", ".json.gz")) else name
            handle.write((line + "\n").encode())


def read_filter_labels(path: str | os.PathLike, num_rows: int, num_labels: int) -> sp.csr_matrix:
    """Read ``filter_labels_*.txt`` (lines ``doc_id label_id``) into a float32 CSR ``(num_rows,
    num_labels)`` of the pairs to exclude. An empty file excludes nothing."""
    path = os.fspath(path)
    lines = [line for line in read_lines_bytes(path).split(b"\n")]
    if lines and lines[-1] == b"":
        lines.pop()
    pairs = np.zeros((len(lines), 2), np.int64)
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise FormatError(
                path, number, f"expected two non-negative integers 'doc_id label_id', got {line[:60]!r}"
            )
        pairs[number - 1] = int(fields[0]), int(fields[1])
        for value, limit, what in (
            (pairs[number - 1, 0], num_rows, "document"),
            (pairs[number - 1, 1], num_labels, "label"),
        ):
            if value >= limit:
                raise FormatError(path, number, f"{what} id {value} out of range (0..{limit - 1})")
    M = sp.csr_matrix(
        (np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(num_rows, num_labels)
    )
    M.sum_duplicates()
    M.data[:] = 1.0
    return M


def label_vocabulary(
    labels_paths: Sequence[str | os.PathLike], vocab_file: str | os.PathLike | None = None
) -> list[str]:
    """The label vocabulary of text pairs: ``vocab_file``'s lines when given, else the sorted set of
    names over all ``labels_paths`` (every split, so train and test share ids), cached in
    ``$XMC_CACHE/labels`` keyed by the files' checksums."""
    if vocab_file is not None:
        names = decode_lines(os.fspath(vocab_file))
        seen: dict[str, int] = {}
        for number, name in enumerate(names, start=1):
            if name in seen:
                raise FormatError(vocab_file, number, f"label {name!r} repeats line {seen[name]}")
            seen[name] = number
        return names
    key = key_of("label-vocab", *(file_checksum(p) for p in labels_paths))
    cached = cache_dir("labels") / f"{key}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8").split("\n")[:-1]
    names = sorted(
        {name for p in labels_paths for line in decode_lines(os.fspath(p)) for name in line.split()}
    )
    with atomic_open(cached) as handle:
        handle.write("".join(f"{n}\n" for n in names).encode())
    return names


def read_text_pairs(
    texts_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    vocabulary: Sequence[str],
    vocab_source: str | os.PathLike | None = None,
) -> TextDataset:
    """Read a ``*_texts.txt`` / ``*_labels.txt`` pair; label names map to ids by their position in
    ``vocabulary`` (see :func:`label_vocabulary`). ``vocab_source`` names the vocabulary in errors."""
    texts_path, labels_path = os.fspath(texts_path), os.fspath(labels_path)
    texts = decode_lines(texts_path)
    label_lines = decode_lines(labels_path)
    if len(texts) != len(label_lines):
        shorter, longer = (
            (texts_path, labels_path) if len(texts) < len(label_lines) else (labels_path, texts_path)
        )
        n = min(len(texts), len(label_lines))
        raise FormatError(
            shorter,
            max(n, 1),
            f"file ends after {n} lines, but {longer} has {max(len(texts), len(label_lines))}",
        )
    index = {name: i for i, name in enumerate(vocabulary)}
    rows = []
    for number, line in enumerate(label_lines, start=1):
        names = line.split()
        missing = [n for n in names if n not in index]
        if missing:
            where = f"the vocabulary {os.fspath(vocab_source)}" if vocab_source else "the label vocabulary"
            raise FormatError(
                labels_path,
                number,
                f"label {missing[0]!r} is not in {where}; "
                "add it there, or build the vocabulary from all splits",
            )
        ids = sorted({index[n] for n in names})
        if len(ids) != len(names):
            raise FormatError(labels_path, number, "a label name repeats within the line")
        rows.append(ids)
    uids = [str(i) for i in range(len(texts))]
    return TextDataset(uids, texts, [""] * len(texts), _rows_to_csr(rows, len(vocabulary)), list(vocabulary))


def write_text_pairs(
    texts_path: str | os.PathLike, labels_path: str | os.PathLike, dataset: TextDataset, names: Sequence[str]
) -> None:
    """Write ``dataset`` as a texts / labels pair; label id ``i`` is written as ``names[i]``, which
    must hold no whitespace. Newlines inside a text become spaces (one document per line)."""
    bad = next((n for n in names if not n or any(c.isspace() for c in n)), None)
    if bad is not None:
        raise ValueError(
            f"label name {bad!r} is empty or holds whitespace: it cannot be written to a labels file"
        )
    Y = dataset.Y.tocsr()
    with atomic_open(texts_path) as handle:
        for text in dataset.texts(sep=" "):
            handle.write((" ".join(text.split()) + "\n").encode())
    with atomic_open(labels_path) as handle:
        for i in range(Y.shape[0]):
            ids = Y.indices[Y.indptr[i] : Y.indptr[i + 1]]
            handle.write((" ".join(names[j] for j in ids) + "\n").encode())
