"""Parsing of the repository's sparse text lines: ``[l1,l2,...] f:v f:v ...``.

The bag-of-words format and the split format (``trn_X_Xf.txt``, ``trn_X_Y.txt``) share this code.

Reading is vectorized: the whole body is parsed by NumPy's C number parser in two calls, and cheap
whole-file checks (token counts, id ranges, sorted rows) decide whether it was well formed. Only
when a check fails does a line-by-line pass run, to name the first bad line and what is wrong with
it. So well-formed files are fast and malformed ones get a precise message; nothing is skipped.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib

import numpy as np
import scipy.sparse as sp

from xmc.data.errors import FormatError

_INT = re.compile(rb"^[0-9]+$")
_SIGNED_INT = re.compile(rb"^[+-]?[0-9]+$")
_WS = (ord(" "), ord("\t"))
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_COUNT = 2**62  # a header count beyond any real dataset (and int64 arithmetic on it overflows)


def read_lines_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes (gunzipped for ``.gz``), a UTF-8 BOM dropped and CRLF turned into LF."""
    path = os.fspath(path)
    with open_input(path) as handle:
        data = read_or_explain(path, handle.read)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return data


def open_input(path: str):
    """Open an input file for reading bytes (gunzipping ``.gz``), with one-line errors for a missing
    file or a folder given instead of one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FormatError(path, None, "is a folder, not a file: name the data file itself")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_or_explain(path: str, read, *args):
    """``read(*args)`` on a file opened by :func:`open_input`, with a :class:`FormatError` for a
    damaged or fake ``.gz`` file instead of a decoder's traceback."""
    try:
        return read(*args)
    except EOFError:
        raise FormatError(path, None, "the gzip file is truncated (an interrupted download?)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise FormatError(
            path, None, f"not a valid gzip file ({err}); name it without .gz if it is plain text"
        ) from None


def split_header(path: str, data: bytes, num_fields: int, names: str) -> tuple[list[int], bytes]:
    """Parse the header line of ``num_fields`` non-negative integers; return them and the body."""
    if not data.strip():
        raise FormatError(path, 1, f"empty file: expected a header line '{names}'")
    header, _, body = data.partition(b"\n")
    fields = header.split()
    if len(fields) != num_fields:
        raise FormatError(
            path, 1, f"bad header {_show(header)}: expected {num_fields} fields '{names}', got {len(fields)}"
        )
    for field in fields:
        if not _INT.match(field):
            raise FormatError(
                path, 1, f"bad header {_show(header)}: {_show(field)} is not a non-negative integer"
            )
        if int(field) > _MAX_COUNT:
            raise FormatError(path, 1, f"bad header {_show(header)}: {_show(field)} is too large a count")
    return [int(f) for f in fields], body


def body_lines(path: str, body: bytes, num_rows: int) -> list[bytes]:
    """Split the body into exactly ``num_rows`` lines (an empty line is a valid empty row)."""
    lines = body.split(b"\n") if body else []
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last row
    if len(lines) < num_rows:
        raise FormatError(
            path,
            1 + len(lines),
            f"file ends after {len(lines)} rows but the header announces {num_rows}",
        )
    if len(lines) > num_rows:
        raise FormatError(
            path,
            num_rows + 2,
            f"extra row: the header announces {num_rows} rows and this is row {num_rows + 1}",
        )
    return lines


def parse_rows(
    path: str, lines: list[bytes], num_cols: int, num_labels: int | None, kind: str = "feature"
) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Parse rows into ``X`` (float32 CSR, shape ``(len(lines), num_cols)``) and, when
    ``num_labels`` is given (bag-of-words), ``Y`` (float32 CSR of ones, ``(len(lines), num_labels)``).

    Line numbers in errors count the header as line 1; ``kind`` names the ``id:value`` ids in them
    (``label`` for a split-format label file).
    """
    if num_labels is None:
        feats = lines
        labels = None
    else:
        labs, feats = [], []
        for line in lines:
            head, _, tail = line.partition(b" ")
            if b":" in head:  # no label field: the first token is already a feature
                labs.append(b"")
                feats.append(line)
            else:
                labs.append(head)
                feats.append(tail)
        labels = _fast_labels(labs, num_labels)
        if labels is None:
            _locate_error(path, lines, num_cols, num_labels, kind)
    features = _fast_features(feats, num_cols)
    if features is None:
        _locate_error(path, lines, num_cols, num_labels, kind)
    X = _csr(*features, shape=(len(lines), num_cols))
    Y = None
    if labels is not None:
        indptr, ids = labels
        Y = _csr(indptr, ids, np.ones(len(ids), np.float32), shape=(len(lines), num_labels))
    return X, Y


def _csr(indptr: np.ndarray, ids: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    index_dtype = np.int32 if max(len(ids), shape[1]) < 2**31 else np.int64
    return sp.csr_matrix(
        (values.astype(np.float32, copy=False), ids.astype(index_dtype), indptr.astype(index_dtype)),
        shape=shape,
    )


def _parse_numbers(text: bytes, dtype: type, sep: str) -> np.ndarray | None:
    """NumPy's C parser over a whole buffer; ``None`` if it stops before the end."""
    if not text.strip():
        return np.zeros(0, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=sep)
        except (ValueError, DeprecationWarning):
            return None


def _fast_labels(labs: list[bytes], num_labels: int) -> tuple[np.ndarray, np.ndarray] | None:
    counts = np.fromiter((lab.count(b",") + 1 if lab else 0 for lab in labs), np.int64, len(labs))
    ids = _parse_numbers(b",".join(lab for lab in labs if lab), np.int64, ",")
    if ids is None or len(ids) != counts.sum():
        return None
    if len(ids) and (ids.min() < 0 or ids.max() >= num_labels):
        return None
    indptr = np.zeros(len(labs) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    ids = _sorted_unique_rows(indptr, ids)
    return None if ids is None else (indptr, ids)


def _fast_features(feats: list[bytes], num_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    counts = np.fromiter((f.count(b":") for f in feats), np.int64, len(feats))
    text = b" ".join(feats)
    if not _one_colon_per_token(text, int(counts.sum())):
        return None
    numbers = _parse_numbers(text.replace(b":", b" "), np.float64, " ")
    if numbers is None or len(numbers) != 2 * counts.sum():
        return None
    ids, values = numbers[0::2], numbers[1::2]
    if len(ids) and (ids.min() < 0 or ids.max() >= num_cols or not np.array_equal(ids, np.floor(ids))):
        return None
    if not (np.abs(values) <= _FLOAT32_MAX).all():  # NaN, infinite, or beyond float32
        return None
    indptr = np.zeros(len(feats) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    ids = ids.astype(np.int64)
    order = _row_sort_order(indptr, ids)
    if order is not None:
        ids, values = ids[order], values[order]
        if _has_duplicates(indptr, ids):
            return None
    return indptr, ids, values.astype(np.float32)


def _one_colon_per_token(text: bytes, num_colons: int) -> bool:
    """True when every whitespace-separated token of ``text`` holds exactly one ``:``."""
    if num_colons == 0:
        return not text.strip()
    buf = np.frombuffer(text, np.uint8)
    space = (buf == _WS[0]) | (buf == _WS[1])
    num_tokens = int(np.count_nonzero(space[:-1] & ~space[1:])) + int(not space[0])
    if num_tokens != num_colons:
        return False
    # Each token has at least one colon if no two colons share a token: whitespace between neighbours.
    colons = np.flatnonzero(buf == ord(":"))
    spaces = np.flatnonzero(space)
    nxt = np.searchsorted(spaces, colons[:-1])
    return bool(np.all((nxt < len(spaces)) & (spaces[np.minimum(nxt, len(spaces) - 1)] < colons[1:])))


def _row_sort_order(indptr: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """``None`` when ids already increase strictly within each row, else a stable per-row sort order."""
    if len(ids) < 2:
        return None
    step = np.diff(ids)
    same_row = np.ones(len(step), bool)
    ends = indptr[1:-1] - 1  # last slot of each row but the final one
    same_row[ends[(ends >= 0) & (ends < len(step))]] = False
    if np.all(step[same_row] > 0):
        return None
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.lexsort((ids, rows))


def _has_duplicates(indptr: np.ndarray, sorted_ids: np.ndarray) -> bool:
    return _row_sort_order(indptr, sorted_ids) is not None


def _sorted_unique_rows(indptr: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    order = _row_sort_order(indptr, ids)
    if order is None:
        return ids
    ids = ids[order]
    return None if _has_duplicates(indptr, ids) else ids


def _locate_error(
    path: str, lines: list[bytes], num_cols: int, num_labels: int | None, kind: str = "feature"
) -> None:
    """Check line by line and raise a :class:`FormatError` for the first bad one."""
    for row, line in enumerate(lines):
        _check_line(path, row + 2, line, num_cols, num_labels, kind)
    raise FormatError(path, None, "malformed content that no single line explains (please report this)")


def _check_line(
    path: str, line_no: int, line: bytes, num_cols: int, num_labels: int | None, kind: str = "feature"
) -> None:
    tail = line
    if num_labels is not None:
        head, _, rest = line.partition(b" ")
        if b":" not in head:
            tail = rest
            if head:
                seen: set[int] = set()
                for token in head.split(b","):
                    label = _parse_id(path, line_no, token, "label", num_labels)
                    if label in seen:
                        raise FormatError(path, line_no, f"duplicate label id {label}")
                    seen.add(label)
    seen = set()
    for token in tail.split():
        if token.count(b":") != 1:
            raise FormatError(path, line_no, f"token {_show(token)} is not of the form 'id:value'")
        id_text, _, value_text = token.partition(b":")
        feature = _parse_id(path, line_no, id_text, kind, num_cols)
        try:
            value = float(value_text)
        except ValueError:
            raise FormatError(
                path, line_no, f"non-numeric value {_show(value_text)} in token {_show(token)}"
            ) from None
        if not np.isfinite(value):
            raise FormatError(path, line_no, f"non-finite value {_show(value_text)} in token {_show(token)}")
        if abs(value) > _FLOAT32_MAX:
            raise FormatError(
                path,
                line_no,
                f"value {_show(value_text)} in token {_show(token)} overflows float32 (largest 3.4e38)",
            )
        if feature in seen:
            raise FormatError(path, line_no, f"duplicate {kind} id {feature}")
        seen.add(feature)


def _parse_id(path: str, line_no: int, token: bytes, kind: str, limit: int) -> int:
    if not _SIGNED_INT.match(token):
        raise FormatError(path, line_no, f"{kind} id {_show(token)} is not an integer")
    value = int(token)
    if value < 0:
        raise FormatError(path, line_no, f"negative {kind} id {value}")
    if value >= limit:
        raise FormatError(
            path, line_no, f"{kind} id {value} out of range: the header allows ids 0..{limit - 1}"
        )
    return value


def _show(text: bytes) -> str:
    shown = text.decode("utf-8", "replace")
    return repr(shown if len(shown) <= 40 else shown[:37] + "...")


def format_rows(X: sp.csr_matrix, Y: sp.csr_matrix | None) -> list[str]:
    """Text lines (without newline) for the rows of ``X`` and, if given, the label rows of ``Y``.

    Values are written in the shortest form that reads back to the same float32.
    """
    X = X.tocsr()
    ids = X.indices.astype(str)
    values = X.data.astype(np.float32).astype(str)
    tokens = np.char.add(np.char.add(ids, ":"), values).tolist() if len(ids) else []
    xp = X.indptr
    if Y is None:
        return [" ".join(tokens[xp[i] : xp[i + 1]]) for i in range(X.shape[0])]
    Y = Y.tocsr()
    labels = Y.indices.astype(str).tolist()
    yp = Y.indptr
    out = []
    for i in range(X.shape[0]):
        feats = " ".join(tokens[xp[i] : xp[i + 1]])
        labs = ",".join(labels[yp[i] : yp[i + 1]])
        out.append(f"{labs} {feats}" if feats else labs)
    return out
