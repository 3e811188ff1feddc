"""Synthetic data: power-law label counts at scale, determinism, readable files, a learnable signal,
and the ``xmc data synth`` command."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import re

import numpy as np
import pytest
import scipy.sparse as sp

import xmc.data.synth as synth
from xmc.cli import UsageError, data_synth
from xmc.data import read_bow, read_lf_json
from xmc.data.synth import SynthOptions, inclusion_probabilities, sample_label_assignment, synthesize


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fitted_exponent(Y: sp.csr_matrix, top: int = 1000) -> float:
    """Least-squares slope of log(count) on log(rank) over the ``top`` most frequent labels."""
    counts = np.sort(np.bincount(Y.indices, minlength=Y.shape[1]))[::-1][:top]
    slope = np.polyfit(np.log(np.arange(1, top + 1)), np.log(counts), 1)[0]
    return -float(slope)


# Few features per document (one signature word per label, ~1 noise word, F = 1000) keep the
# 100k-document files near 10 MB, so one generation takes about a second.
_SCALE = dict(num_labels=1_000_000, num_train=100_000, num_test=1_000, labels_per_doc=5.0, num_features=1000)
_SCALE |= dict(signature_size=4, words_per_label=1, noise_words=1.0, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("exponent", [0.8, 1.2])
def test_power_law_mean_and_determinism_at_scale(tmp_path, exponent):
    options = SynthOptions(exponent=exponent, **_SCALE)
    synthesize(tmp_path / "a", options, progress=False)
    X, Y = read_bow(tmp_path / "a" / "train.txt")
    assert Y.shape == (100_000, 1_000_000) and X.shape == (100_000, 1000)
    assert abs(_fitted_exponent(Y) - exponent) < 0.05
    assert abs(Y.nnz / Y.shape[0] - 5.0) < 0.02 * 5.0
    # Frequency rank is not the label id: the 1000 most frequent ids spread over the whole range.
    top_ids = np.argsort(np.bincount(Y.indices, minlength=Y.shape[1]))[-1000:]
    assert 0.4e6 < top_ids.mean() < 0.6e6
    synthesize(tmp_path / "b", options, progress=False)
    for name in ("train.txt", "test.txt", "synth.json"):
        assert _sha256(tmp_path / "a" / name) == _sha256(tmp_path / "b" / name), name


def test_label_sampling_matches_probabilities():
    # q spans both sampling paths: Bernoulli per document (q >= 0.05) and draw-and-redraw (below).
    q = inclusion_probabilities(60, 3.0, 1.0)
    assert q[0] > synth._BERNOULLI_Q > q[-1]
    num_docs = 20_000
    ranks, docs = sample_label_assignment(q, num_docs, np.random.default_rng(3))
    pairs = ranks * num_docs + docs
    assert len(np.unique(pairs)) == len(pairs), "a document got the same label twice"
    counts = np.bincount(ranks, minlength=len(q))
    expected = num_docs * q
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - q)) + 1)
    # The documents of a tail label are uniform: no bias toward low or high document ids.
    tail_docs = docs[ranks >= np.count_nonzero(q >= synth._BERNOULLI_Q)]
    assert abs(tail_docs.mean() / num_docs - 0.5) < 0.02


def test_inclusion_probabilities_follow_the_power_law():
    q = inclusion_probabilities(1000, 4.0, 0.9)
    assert q.sum() == pytest.approx(4.0)
    assert q[9] / q[0] == pytest.approx(10**-0.9)


@pytest.mark.parametrize("num_labels, m, a", [(200, 5.0, 1.2), (300_000, 20.0, 1.1), (10, 9.9, 0.5)])
def test_impossible_mean_names_the_fix_and_the_fix_works(num_labels, m, a):
    with pytest.raises(ValueError, match="lower labels_per_doc to at most") as info:
        inclusion_probabilities(num_labels, m, a)
    found = re.search(r"at most ([0-9.]+) or exponent to at most ([0-9.]+)", str(info.value))
    max_m, max_a = float(found.group(1)), float(found.group(2))
    assert 0 < max_m < m and 0 <= max_a < a
    inclusion_probabilities(num_labels, max_m, a)  # each suggestion alone is feasible
    inclusion_probabilities(num_labels, m, max_a)
    with pytest.raises(ValueError):  # and close to the limit: a bit more is not
        inclusion_probabilities(num_labels, m, max_a + 0.02)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_train=-5), "num_train"),
        (dict(num_test=-1), "num_test"),
        (dict(num_labels=0), "num_labels"),
        (dict(labels_per_doc=0.0), "labels_per_doc"),
        (dict(exponent=-0.5), "exponent"),
        (dict(noise_words=float("nan")), "noise_words"),
        (dict(format="csv"), "format"),
        (dict(seed=-1), "seed"),
        (dict(num_labels=10, labels_per_doc=11.0), "labels_per_doc"),
    ],
)
def test_bad_options_raise_naming_the_option(tmp_path, change, field):
    with pytest.raises(ValueError, match=field):
        synthesize(tmp_path, SynthOptions(**change), progress=False)
    assert not any(tmp_path.iterdir()), "nothing is written for invalid options"


def _small(**change) -> SynthOptions:
    base = dict(
        num_labels=300, num_train=400, num_test=50, labels_per_doc=3.0, exponent=1.0, num_features=500
    )
    return SynthOptions(**(base | change))


def test_lf_json_is_readable(tmp_path):
    options = _small(format="lf-json")
    result = synthesize(tmp_path, options, progress=False)
    assert sorted(result.files) == sorted(["lbl.json.gz", "trn.json.gz", "tst.json.gz", "synth.json"])
    for name, rows in (("trn.json.gz", 400), ("tst.json.gz", 50)):
        lines = gzip.open(tmp_path / name, "rt", encoding="utf-8").read().splitlines()
        assert len(lines) == rows
        for line in lines:
            record = json.loads(line)
            assert set(record) == {"uid", "title", "content", "target_ind"}
            assert isinstance(record["uid"], str) and isinstance(record["content"], str)
            ids = record["target_ind"]
            assert all(isinstance(i, int) and 0 <= i < 300 for i in ids) and len(set(ids)) == len(ids)
            text = " ".join(part for part in (record["title"], record["content"]) if part)
            assert re.fullmatch(r"(w\d+( w\d+)*)?", text), text
    labels = [json.loads(line) for line in gzip.open(tmp_path / "lbl.json.gz", "rt")]
    assert len(labels) == 300 and all(set(label) == {"uid", "title"} for label in labels)
    dataset = read_lf_json(tmp_path / "trn.json.gz", label_file=tmp_path / "lbl.json.gz")
    assert dataset.Y.shape == (400, 300)
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["options"] == dataclasses.asdict(options)


def test_both_formats_hold_the_same_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "_CHUNK_DOCS", 150)  # several chunks per split, and a partial one
    synthesize(tmp_path, _small(format="both", num_features=40), progress=False)
    for bow_name, lf_name in (("train.txt", "trn.json.gz"), ("test.txt", "tst.json.gz")):
        X, Y = read_bow(tmp_path / bow_name)
        text = read_lf_json(tmp_path / lf_name, label_file=tmp_path / "lbl.json.gz")
        assert (Y != text.Y).nnz == 0
        for i in range(X.shape[0]):
            words = (text.titles[i] + " " + text.contents[i]).split()
            ids, counts = np.unique([int(w[1:]) for w in words], return_counts=True)
            values = 1 + np.log(counts)
            row = X[i]
            assert np.array_equal(row.indices, ids)
            np.testing.assert_allclose(row.data, values / np.linalg.norm(values), atol=6e-5)
    # Writing text as well leaves the bag-of-words file unchanged.
    synthesize(tmp_path / "bow", _small(format="bow", num_features=40), progress=False)
    assert _sha256(tmp_path / "bow" / "train.txt") == _sha256(tmp_path / "train.txt")


def test_seed_changes_the_output(tmp_path):
    for seed in (0, 1):
        synthesize(tmp_path / str(seed), _small(seed=seed, format="both"), progress=False)
    for name in ("train.txt", "trn.json.gz", "lbl.json.gz"):
        assert _sha256(tmp_path / "0" / name) != _sha256(tmp_path / "1" / name), name


def test_no_test_files_without_test_documents(tmp_path):
    result = synthesize(tmp_path, _small(num_test=0, format="both"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result.files)
    assert not (tmp_path / "test.txt").exists() and not (tmp_path / "tst.json.gz").exists()


def test_planted_signal_is_learnable(tmp_path):
    # A flat exponent keeps the most frequent label rare (q_1 ~ 0.08), so guessing it scores low.
    options = SynthOptions(
        num_labels=200, num_train=5000, num_test=1000, labels_per_doc=2.0, exponent=0.6, num_features=2000
    )
    synthesize(tmp_path, options, progress=False)
    X, Y = read_bow(tmp_path / "train.txt")
    X_test, Y_test = read_bow(tmp_path / "test.txt")
    # Nearest centroid: each label's mean training document, cosine-scored against test documents.
    centroids = (Y.T @ X).toarray()
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    best = np.asarray((X_test @ centroids.T).argmax(axis=1)).ravel()
    p_at_1 = Y_test[np.arange(Y_test.shape[0]), best].mean()
    most_frequent = np.bincount(Y.indices, minlength=Y.shape[1]).argmax()
    baseline = Y_test[:, most_frequent].mean()
    assert p_at_1 > 0.5 and p_at_1 > 4 * baseline, (p_at_1, baseline)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xmc data")
    data_synth.register(parser.add_subparsers(dest="data_command", required=True))
    return parser.parse_args(["synth", *argv])


def test_cli_end_to_end(tmp_path, capsys):
    argv = ["--labels-per-doc", "2", "--exponent", "0.7", "--features", "64", "--seed", "4", "--no-progress"]
    args = _cli(["--out", str(tmp_path), "--labels", "50", "--train", "120", "--test", "30", *argv])
    assert args.func(args) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "120 train / 30 test" in summary[0]
    X, Y = read_bow(tmp_path / "train.txt")
    assert X.shape == (120, 64) and Y.shape == (120, 50)
    options = json.loads((tmp_path / "synth.json").read_text())["options"]
    assert options["seed"] == 4 and options["exponent"] == 0.7


def test_cli_flags_cover_every_option():
    assert set(data_synth._FLAGS) == {f.name for f in dataclasses.fields(SynthOptions)}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train", "-10"], r"--train must be an integer >= 1"),
        (["--labels", "-3"], r"--labels must be an integer >= 1"),
        (
            ["--labels", "200", "--labels-per-doc", "5", "--exponent", "1.2"],
            r"lower --labels-per-doc .* --exponent",
        ),
    ],
)
def test_cli_bad_options_are_usage_errors(tmp_path, argv, message):
    args = _cli(["--out", str(tmp_path / "out"), "--no-progress", *argv])
    with pytest.raises(UsageError, match=message):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unknown_format(tmp_path):
    with pytest.raises(SystemExit):
        _cli(["--out", str(tmp_path), "--format", "csv"])


def test_fitted_exponent_helper_recovers_a_clean_power_law():
    # Guards the slow test's measuring stick: exact counts 1e6 * r^-1.2 must fit to 1.2.
    counts = np.round(1e6 * np.arange(1, 1001) ** -1.2).astype(int)
    Y = sp.csr_matrix(
        (np.ones(counts.sum()), np.repeat(np.arange(1000), counts), [0, counts.sum()]), shape=(1, 1000)
    )
    assert math.isclose(_fitted_exponent(Y), 1.2, abs_tol=0.01)


def test_xmc_main_runs_synth_and_reports_mistakes_in_one_line(tmp_path, capsys):
    from xmc.cli import main

    base = ["data", "synth", "--out", str(tmp_path), "--labels", "40", "--train", "60", "--test", "0"]
    assert main([*base, "--labels-per-doc", "2", "--features", "30", "--no-progress"]) == 0
    assert read_bow(tmp_path / "train.txt")[1].shape == (60, 40)
    capsys.readouterr()
    assert main([*base, "--labels-per-doc", "9", "--exponent", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lower --labels-per-doc to at most" in err
