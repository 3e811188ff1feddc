"""Pictures: ``plots/overview.png`` after training, and ``xmc evaluate --plot`` over two runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_worker  # tests/ is on sys.path: its tiny bag-of-words data
import numpy as np
import pytest

from xmc.cli import main
from xmc.config import load_config
from xmc.data import read_bow
from xmc.plots import decile_precision
from xmc.train.run import run_training

PNG = b"\x89PNG\r\n\x1a\n"


def _train(tmp_path: Path, data: Path, classifier: str) -> Path:
    config = tmp_path / f"{classifier}.yaml"
    config.write_text(
        f"data: {{train: {data / 'train.txt'}, test: {data / 'test.txt'}, dev_fraction: 0.25, format: bow}}\n"
        "encoder: {type: bow, dim: 8, dropout: 0.0}\n"
        f"classifier: {{type: {classifier}, fan_in: 3, set: {{interval: 2, fraction: 0.34}}}}\n"
        "train: {epochs: 3, batch_size: 12, encoder_lr: 0.05, classifier_lr: 0.1, warmup: 0.0, "
        "precision: 'no', device: cpu, eval_batch_size: 8}\nseed: 3\n"
    )
    run = tmp_path / classifier
    run_training(load_config(config), str(run), progress=False)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("plots")
    dist_worker.write_data(root / "data")
    return root / "data", _train(root, root / "data", "fixed_fanin"), _train(root, root / "data", "dense")


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_a_training_run_writes_its_overview_and_records_rewirings(runs):
    _, sparse, dense = runs
    assert _is_png(sparse / "plots" / "overview.png") and _is_png(dense / "plots" / "overview.png")
    history = json.loads((sparse / "metrics.json").read_text())["history"]
    counts = [h["rewirings"] for h in history]
    assert counts == sorted(counts) and counts[-1] > 0  # SET every 2 steps
    assert all("rewirings" not in h for h in json.loads((dense / "metrics.json").read_text())["history"])


def test_evaluate_plots_two_runs_side_by_side(runs, tmp_path, capsys):
    data, sparse, dense = runs
    out = tmp_path / "compare.png"
    args = ["evaluate", "--pred", str(sparse), str(dense), "--true", str(data / "test.txt")]
    assert main([*args, "--train", str(data / "train.txt"), "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("rows,") == 2 and f"plot: {out}" in printed
    assert _is_png(out)


def test_deciles_add_up_to_precision_at_k(runs):
    data, sparse, _ = runs
    _, Y_test = read_bow(data / "test.txt")
    _, Y_train = read_bow(data / "train.txt")
    ids = np.load(sparse / "predictions.npz")["indices"]
    metrics = json.loads((sparse / "metrics.json").read_text())["test"]
    deciles = decile_precision(Y_test, ids, Y_train)
    for k in (1, 3, 5):
        assert deciles[k].shape == (10,) and deciles[k].sum() == pytest.approx(metrics[f"P@{k}"])


def test_plot_without_matplotlib_is_one_line(runs, tmp_path, monkeypatch, capsys):
    data, sparse, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    args = [
        "evaluate",
        "--pred",
        str(sparse),
        "--true",
        str(data / "test.txt"),
        "--plot",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()
