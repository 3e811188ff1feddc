"""LF JSON lines, label files, filter-label pairs and texts/labels pairs."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from helpers import shared_file

from xmc.data import (
    FormatError,
    label_vocabulary,
    read_filter_labels,
    read_label_names,
    read_lf_json,
    read_text_pairs,
    write_lf_json,
)

RECORDS = [
    {"uid": "a", "title": "first", "content": "alpha text", "target_ind": [2, 0]},
    {"uid": "b", "title": "second", "content": "", "target_ind": []},
    {"uid": "c", "title": "third", "content": "gamma", "target_ind": [1], "target_rel": [0.5]},
]
LABELS = [{"uid": "L0", "title": "zero"}, {"uid": "L1", "title": "one"}, {"uid": "L2", "title": "two"}]


def _write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_lf_json_reads_records_and_label_file(tmp_path, compress):
    suffix = ".json.gz" if compress else ".json"
    data = _write_jsonl(tmp_path / f"trn{suffix}", RECORDS, compress)
    labels = _write_jsonl(tmp_path / f"lbl{suffix}", LABELS, compress)
    ds = read_lf_json(data, label_file=labels)
    assert ds.uids == ["a", "b", "c"]
    assert ds.Y.shape == (3, 3)
    np.testing.assert_array_equal(ds.Y.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    assert ds.label_names == ["zero", "one", "two"]
    assert ds.texts() == ["first\nalpha text", "second", "third\ngamma"]
    np.testing.assert_array_equal(ds.relevance.toarray(), [[1, 0, 1], [0, 0, 0], [0, 0.5, 0]])
    assert read_label_names(labels, field="uid") == ["L0", "L1", "L2"]


def test_lf_json_round_trip(tmp_path):
    data = _write_jsonl(tmp_path / "trn.json", RECORDS)
    ds = read_lf_json(data, num_labels=3)
    write_lf_json(tmp_path / "out.json.gz", ds)
    again = read_lf_json(tmp_path / "out.json.gz", num_labels=3)
    assert again.uids == ds.uids and again.titles == ds.titles and again.contents == ds.contents
    assert (again.Y != ds.Y).nnz == 0


@pytest.mark.parametrize(
    "line2, fragment",
    [
        ("{not json", "not a JSON object"),
        ('["a list"]', "expected a JSON object"),
        ('{"uid": "x", "title": "t"}', "has no 'target_ind'"),
        ('{"uid": "x", "target_ind": [5]}', "label id 5 out of range"),
        ('{"uid": "x", "target_ind": [-1]}', "negative label id"),
        ('{"uid": "x", "target_ind": [1, 1]}', "duplicate label id"),
        ('{"uid": "x", "target_ind": "1"}', "must be a list of integers"),
        ('{"uid": "x", "target_ind": [1], "target_rel": []}', "'target_rel' must be a list as long"),
    ],
)
def test_lf_json_malformed_names_the_line(tmp_path, line2, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line2 + "\n" + json.dumps(RECORDS[2]) + "\n")
    with pytest.raises(FormatError) as info:
        read_lf_json(path, num_labels=3)
    assert info.value.line == 2 and fragment in str(info.value), str(info.value)


def test_lf_json_empty_file(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(FormatError, match="line 1: empty file"):
        read_lf_json(tmp_path / "empty.json", num_labels=3)


def test_lf_json_bom_and_crlf(tmp_path):
    plain = _write_jsonl(tmp_path / "plain.json", RECORDS)
    variant = tmp_path / "variant.json"
    variant.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    a, b = read_lf_json(plain, num_labels=3), read_lf_json(variant, num_labels=3)
    assert a.uids == b.uids and a.contents == b.contents and (a.Y != b.Y).nnz == 0


def test_eurlex57k_dev_reads():
    root = shared_file("eurlex57k", "dev.json.gz").parent
    ds = read_lf_json(root / "dev.json.gz", label_file=root / "lbl.json.gz")
    assert ds.Y.shape == (6000, 4271)
    with gzip.open(root / "dev.json.gz", "rt", encoding="utf-8") as handle:
        expected = sum(len(json.loads(line)["target_ind"]) for line in handle)
    assert ds.Y.nnz == expected
    assert all(ds.contents)


def test_filter_labels(tmp_path):
    path = tmp_path / "filter_labels_test.txt"
    path.write_text("0 2\n2 1\n0 2\n")
    M = read_filter_labels(path, 3, 4)
    np.testing.assert_array_equal(M.toarray(), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    path.write_text("0 2\n2 9\n")
    with pytest.raises(FormatError, match="line 2: label id 9 out of range"):
        read_filter_labels(path, 3, 4)
    path.write_text("0 2\n1\n")
    with pytest.raises(FormatError, match="line 2: expected two non-negative integers"):
        read_filter_labels(path, 3, 4)


def test_text_pairs_with_a_vocabulary_built_from_all_splits(tmp_path):
    (tmp_path / "train_texts.txt").write_text("a cat\nsome dog\n")
    (tmp_path / "train_labels.txt").write_text("pets cats\ndogs pets\n")
    (tmp_path / "test_texts.txt").write_text("a bird\n")
    (tmp_path / "test_labels.txt").write_text("birds\n")
    label_files = [tmp_path / "train_labels.txt", tmp_path / "test_labels.txt"]
    vocab = label_vocabulary(label_files)
    assert vocab == ["birds", "cats", "dogs", "pets"]
    assert label_vocabulary(label_files) == vocab  # second call reads the cache
    train = read_text_pairs(tmp_path / "train_texts.txt", tmp_path / "train_labels.txt", vocab)
    test = read_text_pairs(tmp_path / "test_texts.txt", tmp_path / "test_labels.txt", vocab)
    assert train.titles == ["a cat", "some dog"]
    np.testing.assert_array_equal(train.Y.toarray(), [[0, 1, 0, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(test.Y.toarray(), [[1, 0, 0, 0]])


def test_text_pairs_errors(tmp_path):
    (tmp_path / "t.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "l.txt").write_text("x\ny\n")
    with pytest.raises(FormatError) as info:
        read_text_pairs(tmp_path / "t.txt", tmp_path / "l.txt", ["x", "y"])
    assert info.value.path == str(tmp_path / "l.txt") and info.value.line == 2
    assert "ends after 2 lines" in str(info.value)

    (tmp_path / "l.txt").write_text("x\ny\nz\n")
    (tmp_path / "vocab.txt").write_text("x\ny\n")
    vocab = label_vocabulary([tmp_path / "l.txt"], tmp_path / "vocab.txt")
    with pytest.raises(FormatError) as info:
        read_text_pairs(tmp_path / "t.txt", tmp_path / "l.txt", vocab, tmp_path / "vocab.txt")
    assert info.value.line == 3 and "'z' is not in the vocabulary" in str(info.value)
