"""Prediction files: round trip, atomic write, and clear errors for broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from xmc.inference.files import load_predictions, save_predictions


def test_round_trip_converts_to_float32_and_int32(tmp_path: Path) -> None:
    scores = np.array([[0.9, 0.5, -np.inf], [0.7, 0.1, 0.0]])  # float64 in, float32 out
    indices = np.array([[4, 2, -1], [0, 1, 3]], dtype=np.int64)
    path = tmp_path / "pred.npz"
    save_predictions(path, scores, indices)
    got_scores, got_indices = load_predictions(path)
    assert got_scores.dtype == np.float32 and got_indices.dtype == np.int32
    np.testing.assert_array_equal(got_scores, scores.astype(np.float32))
    np.testing.assert_array_equal(got_indices, indices)
    with np.load(path) as raw:  # the file itself holds the documented dtypes
        assert raw["indices"].dtype == np.int32 and raw["scores"].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["pred.npz"]  # no temporary left behind


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pred.npz"
    save_predictions(path, np.zeros((1, 2)), np.zeros((1, 2), np.int32))
    before = path.read_bytes()

    def fail_midway(handle, **arrays):  # a write that dies half-way, e.g. a full disk
        handle.write(b"PK partial")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", fail_midway)
        with pytest.raises(OSError, match="disk full"):
            save_predictions(path, np.ones((1, 2)), np.ones((1, 2), np.int32))
    with pytest.raises(ValueError, match="same shape"):
        save_predictions(path, np.zeros((2, 2)), np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="integer"):
        save_predictions(path, np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="-1"):
        save_predictions(path, np.zeros((1, 2)), np.array([[0, -2]]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["pred.npz"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such prediction file"):
        load_predictions(tmp_path / "nope.npz")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"scores": np.zeros((2, 3), np.float32)}, "lacks 'indices'"),
        ({"indices": np.zeros((2, 3), np.int32)}, "lacks 'scores'"),
        ({"indices": np.zeros((2, 3), np.int32), "scores": np.zeros((2, 4), np.float32)}, "one shape"),
        ({"indices": np.zeros(3, np.int32), "scores": np.zeros(3, np.float32)}, "2-D"),
        ({"indices": np.zeros((2, 3), np.float32), "scores": np.zeros((2, 3), np.float32)}, "integers"),
        ({"indices": np.zeros((2, 3), np.int32), "scores": np.zeros((2, 3), np.int32)}, "floating"),
        ({"indices": np.full((2, 3), -5, np.int32), "scores": np.zeros((2, 3), np.float32)}, "-1"),
    ],
)
def test_invalid_files_name_the_file_and_problem(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_predictions(path)
    assert str(path) in str(info.value)


def test_not_an_npz_archive(tmp_path: Path) -> None:
    text = tmp_path / "pred.npz"
    text.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="not a prediction file") as info:
        load_predictions(text)
    assert str(text) in str(info.value)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a prediction file"):
        load_predictions(single)


def test_other_integer_and_float_widths_are_accepted(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "wide.npz", indices=np.array([[1, -1]], np.int64), scores=np.array([[0.5, -np.inf]])
    )
    scores, indices = load_predictions(path)
    assert indices.dtype == np.int32 and indices.tolist() == [[1, -1]]
    assert scores.dtype == np.float32 and scores.tolist() == [[0.5, -np.inf]]
