"""Bag-of-words reader and writer: real files, fixtures, round trips and every malformed input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import FIXTURES, shared_file

from xmc.data import BowWriter, FormatError, read_bow, write_bow


def _independent_counts(path) -> dict:
    """Counts from a plain line-by-line reading, sharing no code with the reader under test."""
    with open(path, encoding="utf-8") as handle:
        n, f, num_labels = (int(v) for v in handle.readline().split())
        rows = features = labels = no_features = no_labels = 0
        for line in handle:
            line = line.rstrip("\n")
            tokens = line.split(" ")
            has_labels = tokens and tokens[0] != "" and ":" not in tokens[0]
            label_count = len(tokens[0].split(",")) if has_labels else 0
            feature_count = sum(1 for t in tokens[1 if has_labels else 0 :] if t)
            rows += 1
            labels += label_count
            features += feature_count
            no_features += feature_count == 0
            no_labels += label_count == 0
    return {
        "shape": (n, f, num_labels),
        "rows": rows,
        "features": features,
        "labels": labels,
        "no_features": no_features,
        "no_labels": no_labels,
    }


@pytest.mark.parametrize(
    "dataset, split, rows_without_features",
    [
        ("bibtex", "train.txt", None),
        ("bibtex", "test.txt", None),
        ("citeulike-t", "train.txt", None),
        ("citeulike-t", "test.txt", None),
    ],
)
def test_real_files_match_independent_counts(dataset, split, rows_without_features):
    path = shared_file(dataset, split)
    expected = _independent_counts(path)
    X, Y = read_bow(path)
    n, f, num_labels = expected["shape"]
    assert X.shape == (n, f) and Y.shape == (n, num_labels) and expected["rows"] == n
    assert X.nnz == expected["features"]
    assert Y.nnz == expected["labels"]
    assert int((np.diff(X.indptr) == 0).sum()) == expected["no_features"]
    assert int((np.diff(Y.indptr) == 0).sum()) == expected["no_labels"]
    assert X.dtype == np.float32 and Y.dtype == np.float32
    assert X.indices.dtype == np.int32 and Y.indices.dtype == np.int32
    assert np.all(Y.data == 1.0)
    assert X.has_sorted_indices and Y.has_sorted_indices


def test_citeulike_rows_without_features():
    path = shared_file("citeulike-t", "train.txt")
    X_train, _ = read_bow(path)
    X_test, _ = read_bow(shared_file("citeulike-t", "test.txt"))
    # The data README: 31 documents have tags but no words (across both splits).
    empty = int((np.diff(X_train.indptr) == 0).sum() + (np.diff(X_test.indptr) == 0).sum())
    assert empty == 31


def test_fixture_with_empty_label_fields():
    X, Y = read_bow(FIXTURES / "tiny.bow.txt")
    dense_x = np.array(
        [[1, 0, 0, 0.5, 0], [0, 2, -1.25, 0, 0], [0] * 5, [0] * 5, [0.25, 0, 0, 0, 1.5], [0, 0, 3, 0, 0]],
        np.float32,
    )
    dense_y = np.array([[1, 0, 1, 0], [0] * 4, [0, 0, 0, 1], [0] * 4, [0, 1, 0, 0], [0] * 4], np.float32)
    np.testing.assert_array_equal(X.toarray(), dense_x)
    np.testing.assert_array_equal(Y.toarray(), dense_y)


def _assert_same(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)  # exact, bit for bit


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    X.data = (rng.standard_normal(X.nnz) * 10 ** rng.uniform(-8, 8, X.nnz)).astype(np.float32)
    Y = sp.random(300, 20, density=0.05, format="csr", dtype=np.float32, random_state=2)
    Y.data[:] = 1
    keep_x, keep_y = np.ones(300, np.float32), np.ones(300, np.float32)
    keep_x[5] = 0  # a row without features
    keep_y[7] = 0  # a row without labels
    X, Y = sp.diags(keep_x) @ X, sp.diags(keep_y) @ Y
    for M in (X, Y):
        M.eliminate_zeros()
        M.sort_indices()  # the reader returns canonical CSR
    write_bow(tmp_path / "a.txt", X, Y)
    X2, Y2 = read_bow(tmp_path / "a.txt")
    _assert_same(X, X2)
    _assert_same(Y, Y2)


def test_round_trip_of_a_real_file(tmp_path):
    X, Y = read_bow(shared_file("citeulike-t", "test.txt"))
    write_bow(tmp_path / "b.txt.gz", X, Y)
    X2, Y2 = read_bow(tmp_path / "b.txt.gz")
    _assert_same(X, X2)
    _assert_same(Y, Y2)


def test_writer_refuses_a_wrong_row_count(tmp_path):
    X = sp.csr_matrix(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="wrote 3 rows"), BowWriter(tmp_path / "c.txt", 4, 3, 3) as writer:
        writer.write(X, X)
    assert not list(tmp_path.iterdir())  # no partial file left behind


GOOD = "3 5 4\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n"


def test_bom_and_crlf_read_like_the_plain_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text(GOOD)
    X, Y = read_bow(plain)
    for name, content in [
        ("bom", "\ufeff" + GOOD),
        ("crlf", GOOD.replace("\n", "\r\n")),
        ("both", "\ufeff" + GOOD.replace("\n", "\r\n")),
    ]:
        path = tmp_path / f"{name}.txt"
        path.write_bytes(content.encode("utf-8"))
        X2, Y2 = read_bow(path)
        _assert_same(X, X2)
        _assert_same(Y, Y2)


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        ("4 5 4\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n", 4, "ends after 3 rows"),
        ("2 5 4\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n", 4, "extra row"),
        ("3 5\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n", 1, "expected 3 fields"),
        ("3 5 4 1\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n", 1, "expected 3 fields"),
        ("3 five 4\n0,1 0:1 2:0.5\n2 1:1\n 3:2\n", 1, "not a non-negative integer"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:1\n 5:2\n", 4, "feature id 5 out of range"),
        ("3 5 4\n0,1 0:1 2:0.5\n4 1:1\n 3:2\n", 3, "label id 4 out of range"),
        ("3 5 4\n0,1 0:1 2:0.5\n-2 1:1\n 3:2\n", 3, "negative label id"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 -1:1\n 3:2\n", 3, "negative feature id"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:abc\n 3:2\n", 3, "non-numeric value"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:nan\n 3:2\n", 3, "non-finite value"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:1 1:2\n 3:2\n", 3, "duplicate feature id 1"),
        ("3 5 4\n0,1 0:1 2:0.5\n2,2 1:1\n 3:2\n", 3, "duplicate label id 2"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:1 4\n 3:2\n", 3, "not of the form 'id:value'"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1:1:1\n 3:2\n", 3, "not of the form 'id:value'"),
        ("3 5 4\n0,1 0:1 2:0.5\n2 1.5:1\n 3:2\n", 3, "is not an integer"),
        ("3 5 4\n0,1 0:1 2:0.5\n2,x 1:1\n 3:2\n", 3, "is not an integer"),
        ("", 1, "empty file"),
        ("\n\n", 1, "empty file"),
    ],
)
def test_malformed_input_names_the_line(tmp_path, content, line, fragment):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(FormatError) as info:
        read_bow(path)
    assert info.value.line == line, str(info.value)
    assert fragment in str(info.value)
    assert str(path) in str(info.value) and f"line {line}" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_bow(tmp_path / "absent.txt")
