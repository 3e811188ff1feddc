"""Condensed export: the condensed model predicts the trained model's top-k, without the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from xmc.cli import main
from xmc.inference.condensed import SparseRows
from xmc.inference.topk import topk_dense

CONFIG = """
data: {{train: '{data}/train.txt', test: '{data}/test.txt', dev_fraction: 0.0, format: bow}}
encoder: {{type: bow, dim: 24, min_df: 1, dropout: 0.1}}
classifier:
  type: {classifier}
  fan_in: 6
  intermediate: {intermediate}
  intermediate_fan_in: {intermediate_fan_in}
  dense_head: {dense_head}
  label_order: {label_order}
  fan_in_group: {fan_in_group}
  set: {{interval: 3, fraction: 0.3, regrow: gradient, gamma: {gamma}}}
train: {{epochs: 2, batch_size: 32, encoder_lr: 0.01, classifier_lr: 0.03, warmup: 0.0}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from xmc.data.synth import SynthOptions, synthesize

    out = tmp_path_factory.mktemp("synth")
    options = SynthOptions(
        num_labels=70, num_train=300, num_test=80, labels_per_doc=3, exponent=0.8, num_features=200, seed=4
    )
    synthesize(out, options, progress=False)
    return out


def _train(tmp_path: Path, data: Path, name: str, **fields) -> Path:
    from xmc.config import load_config
    from xmc.train.run import run_training

    values = {"classifier": "fixed_fanin", "intermediate": 0, "intermediate_fan_in": 0, "gamma": 0.0}
    values.update(dense_head=0, label_order="id", fan_in_group=1)
    values.update(fields)
    (tmp_path / f"{name}.yaml").write_text(CONFIG.format(data=data, **values))
    run_training(load_config(tmp_path / f"{name}.yaml"), str(tmp_path / name), progress=False)
    return tmp_path / name


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"intermediate": 16},  # a dense intermediate layer
        # SRigL-ablated intermediate layer. gamma 0.8 removes half the 16 neurons on CPU (fp32 and bf16); 0.6
        # removed one on CPU and none on an H100, so the test depended on rounding.
        {"intermediate": 16, "intermediate_fan_in": 8, "gamma": 0.8},
        # a dense head over the 12 most frequent labels, the tail in groups of 4 related labels
        {"dense_head": 12, "label_order": "semantic", "fan_in_group": 3},
    ],
    ids=["classifier", "dense-intermediate", "ablated-intermediate", "head-tail"],
)
def test_condensed_model_predicts_the_trained_top_k(tmp_path, data, layout):
    import xmc
    from xmc.data import read_bow
    from xmc.data.source import SplitSource

    run = _train(tmp_path, data, "run", **layout)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "small")]) == 0
    trained, condensed = xmc.load(run, device="cpu"), xmc.load(tmp_path / "small")
    assert type(condensed).__name__ == "CondensedPredictor"
    if layout.get("dense_head"):  # the model stores labels in its own order; everything outside speaks ids
        order = trained.model.classifier.order
        assert not torch.equal(order, torch.arange(len(order)))
        saved = np.load(run / "predictions.npz")["indices"]  # top 100 of 70 labels: -1 after the 70th
        ranked = trained.topk(trained.inputs(SplitSource(X=read_bow(data / "test.txt")[0])), 70)[1]
        assert np.array_equal(saved[:, :70], ranked) and (saved[:, 70:] == -1).all()
    if layout.get("gamma"):
        assert condensed.intermediate.rows < 16, "the ablated neurons are not exported"
    sizes = json.loads((tmp_path / "small" / "model.json").read_text())["condensed"]["bytes"]
    state = trained.model.encoder.state_dict()
    encoder = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    assert sizes["encoder"] == encoder  # a dense head counts as the classifier's, not the encoder's
    X = read_bow(data / "test.txt")[0]
    want_scores, want_ids = trained.topk(trained.inputs(SplitSource(X=X)), 10)
    scores, ids = condensed.topk(condensed.inputs(SplitSource(X=X)), 10, batch_size=7)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # the CLI predicts from the condensed folder like from a run
    out = tmp_path / "pred.npz"
    args = ["predict", "--run", str(tmp_path / "small"), "--input", str(data / "test.txt"), "--k", "5"]
    assert main([*args, "--out", str(out)]) == 0
    assert np.array_equal(np.load(out)["indices"], want_ids[:, :5])


def test_condensed_prediction_loads_no_training_stack(tmp_path, data):
    run = _train(tmp_path, data, "run")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "small")]) == 0
    script = textwrap.dedent(
        f"""
        import sys
        import xmc
        from xmc.data import read_bow
        from xmc.data.source import SplitSource

        model = xmc.load({str(tmp_path / "small")!r})
        scores, ids = model.topk(model.inputs(SplitSource(X=read_bow({str(data / "test.txt")!r})[0])), 3)
        assert ids.shape == (80, 3) and (ids >= 0).all()
        stack = ("xmc.train", "xmc.kernels", "xmc.classifiers", "triton")
        loaded = [m for m in sys.modules if m.startswith(stack)]
        print("LOADED", loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_export_refuses_what_it_cannot_condense(tmp_path, data, capsys):
    run = _train(tmp_path, data, "dense", classifier="dense")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "not fixed fan-in" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_sparse_rows_top_k_in_chunks_equals_the_dense_top_k(monkeypatch):
    import xmc.inference.condensed

    rng = np.random.default_rng(0)
    rows, width, fan_in = 1000, 40, 5
    ids = np.stack([rng.choice(width, fan_in, replace=False) for _ in range(rows)]).astype(np.int16)
    values = rng.standard_normal((rows, fan_in)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    values[7], bias[7], values[900], bias[900] = values[3], bias[3], values[3], bias[3]
    ids[7] = ids[900] = ids[3]  # tied scores: the lower label id ranks first
    layer = SparseRows(values, ids, bias, width)
    x = rng.standard_normal((9, width)).astype(np.float32)
    dense = np.zeros((rows, width), np.float32)
    np.put_along_axis(dense, ids.astype(np.int64), values, axis=1)
    monkeypatch.setattr(xmc.inference.condensed, "SCORE_ELEMENTS", 9 * 64)  # 16 label chunks
    scores, top = layer.topk(x, 8)
    want_scores, want_ids = topk_dense(x @ dense.T + bias, 8)
    assert np.array_equal(top, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
