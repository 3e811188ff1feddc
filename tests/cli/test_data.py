"""``xmc data info`` and ``xmc data convert`` against the Python API."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from helpers import FIXTURES

from xmc.cli import main
from xmc.data import read_bow, read_lf_json, read_split


def test_version_and_help_of_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "xmc", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("xmc ")
    for args in (["data", "info"], ["data", "convert"], ["data", "synth"], ["evaluate"]):
        done = subprocess.run([sys.executable, "-m", "xmc", *args, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: xmc" in done.stdout, args


def test_info_counts(tmp_path, capsys):
    assert main(["data", "info", str(FIXTURES / "tiny.bow.txt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "bow"
    assert (info["points"], info["features"], info["labels"]) == (6, 5, 4)
    assert info["points_without_labels"] == 3 and info["points_without_features"] == 2
    assert info["labels_per_point"]["max"] == 2 and info["label_nonzeros"] == 4
    # label 2 has 1 point in the fixture; train with only labels 0 and 3 -> 1 and 2 unseen
    train = tmp_path / "train.txt"
    train.write_text("2 5 4\n0 0:1\n3 1:1\n")
    assert main(["data", "info", str(FIXTURES / "tiny.bow.txt"), "--train", str(train)]) == 0
    text = capsys.readouterr().out
    assert "labels without training points: 2 (2 positives here fall on them)" in text


def test_convert_bow_split_round_trip(tmp_path):
    pair = f"{tmp_path / 'X_Xf.txt'},{tmp_path / 'X_Y.txt'}"
    assert main(["data", "convert", str(FIXTURES / "tiny.bow.txt"), pair, "--to", "split"]) == 0
    assert main(["data", "convert", pair, str(tmp_path / "back.txt"), "--to", "bow"]) == 0
    X, Y = read_bow(FIXTURES / "tiny.bow.txt")
    X2, Y2 = read_bow(tmp_path / "back.txt")
    X3, Y3 = read_split(tmp_path / "X_Xf.txt", tmp_path / "X_Y.txt")
    for a, b in ((X, X2), (Y, Y2), (X, X3), (Y, Y3)):
        np.testing.assert_array_equal(a.toarray(), b.toarray())


def test_convert_lf_json_to_text_pairs_and_back(tmp_path):
    records = [
        {"uid": "d0", "title": "t0", "content": "first\nbody", "target_ind": [1, 2]},
        {"uid": "d1", "title": "t1", "content": "second", "target_ind": [0]},
    ]
    (tmp_path / "trn.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "lbl.json").write_text(
        "".join(json.dumps({"uid": f"L{i}", "title": f"name {i}"}) + "\n" for i in range(3))
    )
    pair = f"{tmp_path / 'train_texts.txt'},{tmp_path / 'train_labels.txt'}"
    args = [
        "data",
        "convert",
        str(tmp_path / "trn.json"),
        pair,
        "--to",
        "text",
        "--labels",
        str(tmp_path / "lbl.json"),
    ]
    assert main(args) == 0
    assert (tmp_path / "train_labels.txt").read_text() == "L1 L2\nL0\n"
    assert (tmp_path / "train_texts.txt").read_text() == "t0 first body\nt1 second\n"
    out = tmp_path / "out" / "trn.json.gz"
    assert main(["data", "convert", pair, str(out), "--to", "lf-json"]) == 0
    back = read_lf_json(out, label_file=tmp_path / "out" / "lbl.json.gz")
    assert back.label_names == ["L0", "L1", "L2"]  # the vocabulary of names, sorted
    np.testing.assert_array_equal(back.Y.toarray(), [[0, 1, 1], [1, 0, 0]])


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "absent.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3 2\n0 0:1\n")
    assert main(["data", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2: file ends after 1 rows" in err
    args = ["data", "convert", str(FIXTURES / "tiny.bow.txt"), str(tmp_path / "x.json"), "--to", "lf-json"]
    assert main(args) == 2
    assert "do not convert into each other" in capsys.readouterr().err
