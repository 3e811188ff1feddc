"""``xmc evaluate`` on tiny files, checked against the hand-computed metrics and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmc import metrics
from xmc.cli import main
from xmc.data import write_bow
from xmc.inference.files import save_predictions

# The hand case of test_metrics.py: 4 rows, 6 labels, row 2 without labels, row 0 padded with -1.
# Hits: row 0 ranks 1 and 3, row 1 rank 1, row 3 ranks 2-4, so P@1, P@3, P@5 = 50, 41.67, 30 %.
TRUE_ROWS = [[0, 2], [1], [], [3, 4, 5]]
TOP = np.array([[2, 1, 0, -1, -1], [1, 3, 4, 5, 0], [0, 1, 2, 3, 4], [0, 5, 3, 4, 1]], dtype=np.int32)
# Training label counts [6, 3, 3, 2, 1, 0]: head {0}, torso {1, 2}, tail {3, 4, 5}.
TRAIN_ROWS = [[0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 2], [0, 2], [0, 2]]


def labels(rows: list[list[int]], num_labels: int = 6) -> sp.csr_matrix:
    coo = [(i, label) for i, row in enumerate(rows) for label in row]
    r, c = zip(*coo, strict=True) if coo else ((), ())
    return sp.csr_matrix((np.ones(len(coo), np.float32), (r, c)), shape=(len(rows), num_labels))


def write_split(path: Path, rows: list[list[int]]) -> Path:
    X = sp.csr_matrix(np.ones((len(rows), 2), np.float32))
    write_bow(path, X, labels(rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    pred = tmp_path / "pred.npz"
    save_predictions(pred, -np.arange(TOP.size, dtype=np.float32).reshape(TOP.shape), TOP)
    return {
        "pred": pred,
        "true": write_split(tmp_path / "test.txt", TRUE_ROWS),
        "train": write_split(tmp_path / "train.txt", TRAIN_ROWS),
        "dir": tmp_path,
    }


def table_row(output: str, name: str) -> list[str]:
    for line in output.splitlines():
        if line.split() and line.split()[0] == name:
            return line.split()[1:]
    raise AssertionError(f"no row {name!r} in:\n{output}")


def test_prints_table_and_writes_json(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out_json = files["dir"] / "out" / "metrics.json"
    rc = main(
        ["evaluate", "--pred", str(files["pred"]), "--true", str(files["true"]), "--json", str(out_json)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert table_row(printed, "P") == ["50.00", "41.67", "30.00"]
    assert table_row(printed, "R") == ["37.50", "66.67", "75.00"]
    assert table_row(printed, "RP") == ["50.00", "66.67", "75.00"]
    assert "PSP" not in printed and "P/head" not in printed  # need --train
    saved = json.loads(out_json.read_text())
    assert saved == pytest.approx(metrics.evaluate(labels(TRUE_ROWS), TOP))
    assert saved["P@3"] == pytest.approx(5 / 12)


def test_train_adds_propensity_coverage_and_frequency_groups(
    files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out_json = files["dir"] / "m.json"
    args = ["evaluate", "--pred", str(files["pred"]), "--true", str(files["true"])]
    assert main([*args, "--train", str(files["train"]), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert table_row(printed, "C") == ["33.33", "83.33", "100.00"]  # 2, 5, 6 of the 6 labels
    assert table_row(printed, "P/head") == ["0.00", "8.33", "5.00"]  # 0/4, 1/12, 1/20
    assert table_row(printed, "P/torso") == ["50.00", "16.67", "10.00"]
    assert table_row(printed, "P/tail") == ["0.00", "16.67", "15.00"]
    saved = json.loads(out_json.read_text())
    inv_prop = metrics.inv_propensity(labels(TRAIN_ROWS), 0.55, 1.5)  # "other" is the default
    expected = metrics.evaluate(labels(TRUE_ROWS), TOP, inv_prop)
    assert {key: saved[key] for key in expected} == pytest.approx(expected)
    # An explicit A,B pair and a preset reach inv_propensity unchanged.
    for option, (A, B) in (("1,1", (1.0, 1.0)), ("wikipedia", (0.5, 0.4))):
        main([*args, "--train", str(files["train"]), "--propensity", option, "--json", str(out_json)])
        inv_prop = metrics.inv_propensity(labels(TRAIN_ROWS), A, B)
        want = metrics.evaluate(labels(TRUE_ROWS), TOP, inv_prop)["PSP@3"]
        assert json.loads(out_json.read_text())["PSP@3"] == pytest.approx(want)


def test_exclude_and_ks(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    # Excluding (0, 2) removes row 0's rank-1 hit from both sides: its hit at rank 3 moves to rank 2.
    filt = files["dir"] / "filter_labels_test.txt"
    filt.write_text("0 2\n")
    out_json = files["dir"] / "m.json"
    rc = main(
        ["evaluate", "--pred", str(files["pred"]), "--true", str(files["true"]), "--exclude", str(filt)]
        + ["--ks", "1,2", "--json", str(out_json)]
    )
    assert rc == 0
    assert table_row(capsys.readouterr().out, "P") == ["25.00", "37.50"]  # (0+1+0+0)/4, (1+1+0+1)/2/4
    assert sorted(json.loads(out_json.read_text())) == sorted(
        f"{family}@{k}" for family in ("P", "nDCG", "R", "RP") for k in (1, 2)
    )


def test_lf_json_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # LF JSON lines with a label file of 8 labels (two more than any row uses).
    lines = [
        {"uid": str(i), "title": f"doc {i}", "content": "", "target_ind": row}
        for i, row in enumerate(TRUE_ROWS)
    ]
    (tmp_path / "tst.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "lbl.json").write_text(
        "".join(json.dumps({"uid": str(i), "title": f"l{i}"}) + "\n" for i in range(8))
    )
    pred = tmp_path / "p.npz"
    save_predictions(pred, np.zeros(TOP.shape), np.where(TOP == 4, 7, TOP))  # label 7 is wrong everywhere
    rc = main(
        [
            "evaluate",
            "--pred",
            str(pred),
            "--true",
            str(tmp_path / "tst.json"),
            "--labels",
            str(tmp_path / "lbl.json"),
        ]
    )
    assert rc == 0
    assert table_row(capsys.readouterr().out, "P") == [
        "50.00",
        "41.67",
        "25.00",
    ]  # row 3 loses its rank-4 hit


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ks", "1,9"], "top 5"),
        (["--ks", "1,x"], "--ks"),
        (["--propensity", "amazon"], "needs --train"),
        (["--train", "TRAIN", "--propensity", "0.5"], "--propensity"),
    ],
)
def test_usage_errors(
    files: dict[str, Path], capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    extra = [str(files["train"]) if item == "TRAIN" else item for item in extra]
    rc = main(["evaluate", "--pred", str(files["pred"]), "--true", str(files["true"]), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("xmc evaluate: error:") and message in err


def test_mismatched_files(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    # The training split as truth: 6 rows against 4 predicted rows.
    assert main(["evaluate", "--pred", str(files["pred"]), "--true", str(files["train"])]) == 2
    assert "4 rows" in capsys.readouterr().err
    # A prediction naming label 6 of a 6-label set.
    bad = files["dir"] / "bad.npz"
    save_predictions(bad, np.zeros(TOP.shape), np.where(TOP == 5, 6, TOP))
    assert main(["evaluate", "--pred", str(bad), "--true", str(files["true"])]) == 2
    assert "label 6" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(files["dir"] / "none.npz"), "--true", str(files["true"])]) == 2
    assert "no such prediction file" in capsys.readouterr().err


def test_help_describes_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--pred",
        "--true",
        "--true-format",
        "--labels",
        "--train",
        "--propensity",
        "--exclude",
        "--ks",
    ):
        assert option in text
    assert "wikipedia" in text and "PSP@k" in text
