"""Format detection and format-independent loading of labels."""

from __future__ import annotations

import os

import scipy.sparse as sp

from xmc.data.bow import read_bow
from xmc.data.errors import FormatError
from xmc.data.sparse_text import open_input, read_or_explain
from xmc.data.split import read_sparse_matrix, read_split
from xmc.data.text import label_vocabulary, read_lf_json, read_text_pairs

FORMATS = ("bow", "split", "lf-json", "text")


def split_pair(path: str | os.PathLike) -> tuple[str, str] | None:
    """``("a", "b")`` for a two-file path written ``a,b``; ``None`` for a single path."""
    path = os.fspath(path)
    if "," not in path or os.path.exists(path):
        return None
    first, second = path.split(",", 1)
    return first, second


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of ``path`` (one of :data:`FORMATS`) from its name and header line.

    ``X,Y`` pairs are ``text`` when the first file ends in ``texts.txt``, else ``split``; ``.json``
    and ``.json.gz`` files are ``lf-json``; other files are ``bow`` when their header holds three
    integers and ``split`` (a single matrix) when it holds two.
    """
    pair = split_pair(path)
    if pair is not None:
        return "text" if pair[0].endswith("texts.txt") else "split"
    path = os.fspath(path)
    if path.endswith((".json", ".json.gz")):
        return "lf-json"
    with open_input(path) as handle:
        header = read_or_explain(path, handle.readline).lstrip(b"\xef\xbb\xbf").split()
    if header and all(field.isdigit() for field in header) and len(header) in (2, 3):
        return "bow" if len(header) == 3 else "split"
    raise FormatError(
        path,
        1,
        "cannot tell the format: expected a header 'N F L' (bow) or 'rows cols' (split); pass the format",
    )


def load_split(
    path: str | os.PathLike, format: str = "auto", labels_file: str | os.PathLike | None = None
) -> tuple[sp.csr_matrix | None, sp.csr_matrix, str]:
    """``(X, Y, format)`` of one split in any supported format; ``X`` is ``None`` for raw text.

    ``path`` is a bag-of-words file, a split-format ``X,Y`` pair (or a lone ``*_X_Y.txt`` labels file),
    an LF JSON lines file (``labels_file`` = ``lbl.json(.gz)`` fixes L), or a ``texts,labels`` pair
    (``labels_file`` = the label vocabulary, one name per line; without it the vocabulary comes from
    this labels file alone).
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    pair = split_pair(path)
    if fmt == "bow":
        X, Y = read_bow(path)
        return X, Y, fmt
    if fmt == "split":
        if pair is not None:
            X, Y = read_split(*pair)
            return X, Y, fmt
        Y = read_sparse_matrix(path, "label")
        Y.data[:] = 1.0
        return None, Y, fmt
    if fmt == "lf-json":
        return None, read_lf_json(path, label_file=labels_file).Y, fmt
    if pair is None:
        raise ValueError(f"{os.fspath(path)}: the text format takes a 'texts.txt,labels.txt' pair")
    vocabulary = label_vocabulary([pair[1]], labels_file)
    return None, read_text_pairs(pair[0], pair[1], vocabulary, labels_file).Y, fmt


def load_labels(
    path: str | os.PathLike, format: str = "auto", labels_file: str | os.PathLike | None = None
) -> sp.csr_matrix:
    """The label matrix ``Y`` (float32 CSR ``(N, L)``, ones) of a split in any format (see
    :func:`load_split` for the paths and ``labels_file`` each format takes)."""
    return load_split(path, format, labels_file)[1]
