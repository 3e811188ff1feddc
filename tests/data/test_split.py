"""The split format: ``*_X_Xf.txt`` features and ``*_X_Y.txt`` labels."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FIXTURES

from xmc.data import FormatError, read_bow, read_sparse_matrix, read_split, write_split


def test_split_round_trip_equals_bow(tmp_path):
    X, Y = read_bow(FIXTURES / "tiny.bow.txt")
    write_split(tmp_path / "X_Xf.txt", tmp_path / "X_Y.txt", X, Y)
    assert (tmp_path / "X_Y.txt").read_text().splitlines()[:2] == ["6 4", "0:1.0 2:1.0"]
    X2, Y2 = read_split(tmp_path / "X_Xf.txt", tmp_path / "X_Y.txt")
    np.testing.assert_array_equal(X.toarray(), X2.toarray())
    np.testing.assert_array_equal(Y.toarray(), Y2.toarray())


def test_split_errors(tmp_path):
    (tmp_path / "X.txt").write_text("2 3\n0:1\n1:1 2:1\n")
    (tmp_path / "Y.txt").write_text("3 2\n0:1\n1:1\n0:1\n")
    with pytest.raises(FormatError, match="3 rows, but the features file"):
        read_split(tmp_path / "X.txt", tmp_path / "Y.txt")
    (tmp_path / "Y.txt").write_text("2 2\n0:1\n2:1\n")
    with pytest.raises(FormatError, match="line 3: feature id 2 out of range"):
        read_sparse_matrix(tmp_path / "Y.txt")
    (tmp_path / "Y.txt").write_text("2 2 1\n0:1\n1:1\n")
    with pytest.raises(FormatError, match="line 1: bad header"):
        read_sparse_matrix(tmp_path / "Y.txt")
