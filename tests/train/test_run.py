"""End-to-end training: every encoder with both classifiers, resume after SIGKILL, fp16 overflow,
user errors, and learning planted synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xmc.cli import main
from xmc.config import load_config, save_config
from xmc.data.synth import SynthOptions, synthesize
from xmc.train.run import run_training

CONFIG = """
data: {{train: '{train}', test: '{test}', dev_fraction: {dev_fraction}, format: {format}{labels}}}
encoder: {{type: {encoder}, dim: 32, min_df: 1, dropout: 0.1}}
classifier: {{type: fixed_fanin, fan_in: 8, set: {{interval: 3, fraction: 0.3}}}}
train: {{epochs: 2, batch_size: 32, encoder_lr: 0.01, classifier_lr: 0.03, eval_batch_size: 64, warmup: 0.0}}
"""
# A dense head over the 10 most frequent labels, the tail in groups of 4 related labels.
HEAD_TAIL = ["classifier.dense_head=10", "classifier.label_order=semantic", "classifier.fan_in_group=4"]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out,
        SynthOptions(
            num_labels=60,
            num_train=400,
            num_test=100,
            labels_per_doc=3,
            exponent=0.8,
            num_features=300,
            format="both",
            noise_words=5,
            seed=1,
        ),
        progress=False,
    )
    return out


def _config(tmp_path: Path, data: Path, encoder="bow", fmt="bow", dev_fraction=0.0, overrides=()):
    if fmt == "bow":
        train, test, labels = data / "train.txt", data / "test.txt", ""
    elif fmt == "lf-json":
        train, test, labels = data / "trn.json.gz", data / "tst.json.gz", f", labels: {data / 'lbl.json.gz'}"
    else:  # features
        train, test, labels = (
            f"{data / 'train.npy'},{data / 'train.txt'}",
            f"{data / 'test.npy'},{data / 'test.txt'}",
            "",
        )
    path = tmp_path / "config.yaml"
    path.write_text(
        CONFIG.format(
            train=train, test=test, dev_fraction=dev_fraction, format=fmt, labels=labels, encoder=encoder
        )
    )
    return load_config(path, list(overrides))


def _losses(metrics: dict) -> list[float]:
    return [h["train_loss"] for h in metrics["history"]]


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(300)]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("classifier", ["dense", "fixed_fanin", "rps"])
@pytest.mark.parametrize("encoder", ["bow", "transformer", "features"])
def test_every_encoder_trains_with_every_classifier(tmp_path, synth_data, encoder, classifier):
    overrides = [f"classifier.type={classifier}", "train.epochs=3"]
    fmt = {"bow": "bow", "transformer": "lf-json", "features": "features"}[encoder]
    if encoder == "transformer":
        overrides += [
            f"encoder.name_or_path={_tiny_bert(tmp_path / 'bert')}",
            "encoder.max_length=32",
            "train.encoder_lr=0.001",
        ]
    if encoder == "features":  # fixed embeddings: a random projection of the bag of words
        from xmc.data import read_bow

        projection = np.random.default_rng(0).standard_normal((300, 48)).astype(np.float32)
        for split in ("train", "test"):
            np.save(synth_data / f"{split}.npy", read_bow(synth_data / f"{split}.txt")[0] @ projection)
    config = _config(tmp_path, synth_data, encoder, fmt, overrides=overrides)
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    losses = _losses(metrics)
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "run" / "predictions.npz").exists() and metrics["test"]["P@1"] > 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written) >= {
        "test",
        "peak_memory_bytes",
        "train_seconds",
        "examples_per_second",
        "params",
        "device",
    }
    memory = written["peak_memory_bytes"]  # CUDA: allocated and reserved; CPU: resident set size
    assert set(memory) in ({"allocated", "reserved"}, {"rss"}) and min(memory.values()) > 0


def test_api_predicts_label_names(tmp_path, synth_data):
    import xmc

    config = _config(tmp_path, synth_data, "bow", "lf-json", overrides=["train.epochs=1"])
    run_training(config, str(tmp_path / "run"), progress=False)
    predictor = xmc.load(tmp_path / "run", device="cpu")
    out = predictor.predict(["w1 w2 w3", "w10 w11"], k=4)
    assert len(out) == 2 and all(len(row) == 4 for row in out)
    names = set(predictor.label_names)
    assert all(name in names for row in out for name, _ in row)
    assert out[0][0][1] >= out[0][1][1]  # best first


KILLER = """
import os, signal, sys
from xmc.config import load_config, save_config
from xmc.train.run import run_training

def hook(model, step, optimizers, scaler):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

run_training(load_config(sys.argv[1]), sys.argv[2], progress=False, step_hook=hook)
"""


@pytest.mark.parametrize("state", ["fp32", "bf16", "head-tail"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, synth_data, state):
    """bf16: the classifier's bf16 weights and moments, and its stochastic rounding, resume exactly too;
    head-tail: a dense head, a grouped tail in semantic order, and its rewiring."""
    overrides = [
        "train.save_every=4",
        "train.epochs=3",
        f"train.classifier_state={'fp32' if state == 'head-tail' else state}",
    ]  # 13 steps an epoch
    if state == "head-tail":
        overrides += HEAD_TAIL
    config = _config(tmp_path, synth_data, overrides=overrides)
    reference = run_training(config, str(tmp_path / "whole"), progress=False)
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER.format(kill_at=18)))  # mid-epoch 2, after the step-16 checkpoint
    save_config(config, tmp_path / "resolved.yaml")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "resolved.yaml"), str(tmp_path / "cut")]
    )
    assert done.returncode == -9
    assert (tmp_path / "cut" / "latest").read_text() == "ckpt-000000016"
    resumed = run_training(config, str(tmp_path / "cut"), resume=True, progress=False)
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    whole = load_file(str(tmp_path / "whole" / "best.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "best.safetensors"))
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    classifier_dtypes = {
        t.dtype for name, t in whole.items() if name.startswith("classifier.") and t.is_floating_point()
    }
    assert classifier_dtypes == {torch.bfloat16 if state == "bf16" else torch.float32}
    if state == "head-tail":
        assert "classifier.order" in whole and "classifier.head.weight" in whole
    losses = _losses(reference)
    assert losses[-1] < losses[0]


def test_bf16_classifier_state_rejects_what_it_cannot_serve(tmp_path, synth_data):
    for overrides, problem in (
        (["train.classifier_optimizer=sgd"], "set train.classifier_optimizer=adamw"),
        (["classifier.type=rps"], "not rps"),
    ):
        config = _config(tmp_path, synth_data, overrides=["train.classifier_state=bf16", *overrides])
        with pytest.raises(ValueError, match=problem):
            run_training(config, str(tmp_path / "run"), progress=False)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, synth_data):
    seen = {}

    def hook(model, step, optimizers, scaler):
        if step == 2 and "state" not in seen:
            seen["state"] = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            seen["optim"] = [
                {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in o.state.items()}
                for o in optimizers
            ]
            seen["scale"] = scaler.get_scale()
            model.classifier.layer.weight.grad[0, 0] = float("inf")
        elif step == 2:  # the same step number again: the poisoned one was skipped
            for name, value in seen["state"].items():
                assert torch.equal(model.state_dict()[name], value), name
            for before, optimizer in zip(seen["optim"], optimizers, strict=True):
                for param, state in optimizer.state.items():
                    for key, tensor in before[param].items():
                        assert torch.equal(state[key], tensor), key
            assert scaler.get_scale() < seen["scale"]
            seen["checked"] = True

    config = _config(
        tmp_path,
        synth_data,
        overrides=["train.precision=fp16", "train.epochs=1", "classifier.set.interval=1"],
    )
    metrics = run_training(config, str(tmp_path / "run"), progress=False, step_hook=hook)
    assert seen.get("checked") and metrics["skipped_steps"] == 1


def test_user_errors_are_one_clear_line(tmp_path, synth_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: {synth_data / 'train.txt'}}}\n")
    cases = [
        (
            ["--config", str(config), "train.epoch=3"],
            "unknown config key 'train.epoch'; did you mean 'train.epochs'?",
        ),
        (
            ["--config", str(config), "data.train=/nonexistent/train.txt"],
            "data.train: /nonexistent/train.txt not found",
        ),
        (
            [
                f"data.train={synth_data / 'trn.json.gz'}",
                "encoder.type=transformer",
                "encoder.name_or_path=/nonexistent/model",
            ],
            "/nonexistent/model",
        ),
    ]
    for args, fragment in cases:
        assert main(["train", "--no-progress", "--run-dir", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_planted_synthetic_labels_are_learned(tmp_path):
    out = tmp_path / "synth"
    # A flat power law (a = 0.5): the most frequent label is in ~1% of documents, so 10x its P@1 is
    # reachable; every label shows its whole 10-word signature (measured: P@1 0.21 against 0.011).
    synthesize(
        out,
        SynthOptions(
            num_labels=10_000,
            num_train=16_000,
            num_test=1_000,
            labels_per_doc=2,
            exponent=0.5,
            num_features=5_000,
            words_per_label=10,
            noise_words=5,
            format="bow",
            seed=3,
        ),
        progress=False,
    )
    config = _config(
        tmp_path,
        out,
        overrides=[
            "encoder.dim=256",
            "classifier.fan_in=32",
            "train.epochs=4",
            "train.batch_size=128",
            "classifier.set.interval=20",
            "train.encoder_lr=0.03",
            "train.classifier_lr=0.03",
        ],
    )
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    p1, base = metrics["test"]["P@1"], metrics["baseline_most_frequent"]["P@1"]
    assert p1 >= 10 * base, (p1, base)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, synth_data):
    config = _config(tmp_path, synth_data, overrides=["train.epochs=2"])

    def interrupt(model, step, optimizers, scaler):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(config, str(tmp_path / "run"), progress=False, step_hook=interrupt)
    assert (tmp_path / "run" / "latest").read_text() == "ckpt-000000005"  # the last completed step
    # The CLI resumes with the run's own config.yaml.
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    whole = run_training(config, str(tmp_path / "whole"), progress=False)
    assert resumed["optimizer_steps"] == whole["optimizer_steps"]
    a = load_file(str(tmp_path / "run" / "best.safetensors"))
    b = load_file(str(tmp_path / "whole" / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_select_keeps_the_model_with_the_best_dev_metric_and_binds_the_run(tmp_path, synth_data):
    """train.select=P@5 keeps the evaluation with the highest dev P@5 (metrics.json's dev scores are the
    kept model's); resuming that run with another select metric is refused, naming the fix."""
    config = _config(
        tmp_path,
        synth_data,
        dev_fraction=0.25,
        overrides=["train.select=P@5", "train.epochs=4", "train.save_every=3"],
    )
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    by_epoch = [h["dev/P@5"] for h in metrics["history"] if "dev/P@5" in h]
    assert len(by_epoch) == 4
    assert metrics["dev"]["P@5"] == pytest.approx(max(by_epoch))
    (tmp_path / "run" / "metrics.json").unlink()
    other = _config(tmp_path, synth_data, dev_fraction=0.25, overrides=["train.select=P@1", "train.epochs=5"])
    with pytest.raises(ValueError, match="keeps its best model by dev P@5.*resume with train.select=P@5"):
        run_training(other, str(tmp_path / "run"), resume=True, progress=False)


def test_fixed_fanin_over_the_raw_tfidf_vector(tmp_path, synth_data):
    """encoder.dim=0: the TF-IDF vector itself feeds fixed fan-in (no encoder parameters); it learns."""
    config = _config(
        tmp_path, synth_data, overrides=["encoder.dim=0", "classifier.fan_in=16", "train.epochs=3"]
    )
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    losses = _losses(metrics)
    assert losses[-1] < losses[0], losses
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["params"]["encoder"] == 0
    import xmc

    predictor = xmc.load(tmp_path / "run", device="cpu")
    assert predictor.model.encoder.out_features == 300  # the synthetic set's features


@pytest.mark.parametrize("fill", ["random", "frequent", "related"])
def test_centroid_ids_over_the_raw_tfidf_vector(tmp_path, synth_data, fill):
    """classifier.ids=centroid: the initial ids are each label's strongest TF-IDF features; with the
    SET rewiring off they are the trained model's ids, and the run learns. centroid_fill=frequent fills
    the other slots with the heaviest TF-IDF columns, related first with its co-occurring labels'."""
    from xmc.data.bow import read_bow
    from xmc.encoders import fit_idf, tfidf
    from xmc.sparse.centroid import centroid_ids, frequent_fill, related_fill

    overrides = [
        "encoder.dim=0",
        "classifier.fan_in=64",  # 5 of the 60 labels have fewer than 64 distinct features: filled
        "classifier.ids=centroid",
        f"classifier.centroid_fill={fill}",
        "classifier.set.enabled=false",
    ]
    config = _config(tmp_path, synth_data, overrides=[*overrides, "classifier.bias_init=prior"])
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    losses = _losses(metrics)
    assert losses[-1] < losses[0], losses
    X, Y = read_bow(synth_data / "train.txt")
    inputs = tfidf(X, fit_idf(X))
    ids = centroid_ids(inputs, Y, 64)
    trained = load_file(str(tmp_path / "run" / "best.safetensors"))["classifier.layer.indices"].long().numpy()
    picked = ids >= 0
    assert picked.mean() > 0.5 and (trained[picked] == ids[picked]).all() and not picked.all()
    assert (fill == "frequent") == (trained == frequent_fill(ids, inputs)).all()
    related = frequent_fill(related_fill(ids, inputs, Y), inputs)
    assert (fill == "related") == (trained == related).all()
    if fill != "random":
        return
    bad = _config(tmp_path, synth_data, overrides=["classifier.ids=centroid"])  # a learned projection
    with pytest.raises(ValueError, match="encoder.dim=0"):
        run_training(bad, str(tmp_path / "bad"), progress=False)


SVM_HEAD = ["encoder.dim=0", "classifier.dense_head=10", "classifier.head_fit=svm", "classifier.fan_in=16"]


def test_svm_head_is_solved_once_and_frozen_through_training_and_resume(tmp_path, synth_data):
    """classifier.head_fit=svm: the 10 most frequent labels' rows are converged squared-hinge SVMs over
    the training TF-IDF (the solver's own output on the same inputs), untouched by the tail's training
    and by a resume; the optimizer holds no state for them, and the run learns."""
    from xmc.classifiers.head_tail import frequency_order
    from xmc.classifiers.svm import fit_squared_hinge_svms
    from xmc.data.bow import read_bow
    from xmc.encoders import fit_idf, tfidf

    config = _config(tmp_path, synth_data, overrides=[*SVM_HEAD, "train.epochs=1", "classifier.head_jobs=1"])
    first = run_training(config, str(tmp_path / "run"), progress=False)  # the reference below uses 2
    X, Y = read_bow(synth_data / "train.txt")
    head = frequency_order(Y, 10)[:10]
    W, b = fit_squared_hinge_svms(tfidf(X, fit_idf(X)), Y.tocsc()[:, head], 1.0, jobs=2)
    state = load_file(str(tmp_path / "run" / "best.safetensors"))
    np.testing.assert_allclose(state["classifier.head.weight"].numpy(), W, atol=1e-4)
    np.testing.assert_allclose(state["classifier.head.bias"].numpy(), b, atol=1e-4)
    assert first["test"]["P@1"] > 0.5 and first["head_fit_seconds"] > 0
    state_bytes = first["classifier_state_bytes"]

    resumed = load_config(tmp_path / "run" / "config.yaml", ["train.epochs=2"])
    second = run_training(resumed, str(tmp_path / "run"), resume=True, progress=False)
    after = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert torch.equal(after["classifier.head.weight"], state["classifier.head.weight"])
    assert not torch.equal(after["classifier.tail.layer.weight"], state["classifier.tail.layer.weight"])
    assert _losses(second)[-1] < _losses(second)[0]

    sgd = _config(tmp_path, synth_data, overrides=[*SVM_HEAD[:2], "classifier.fan_in=16", "train.epochs=1"])
    trained = run_training(sgd, str(tmp_path / "sgd"), progress=False)
    head_floats = 10 * (300 + 1)  # the frozen head: weights only; a trained one adds gradients, 2 moments
    assert trained["classifier_state_bytes"] - state_bytes == 3 * 4 * head_floats


def test_setup_steps_share_one_copy_of_the_training_inputs(tmp_path, synth_data, monkeypatch):
    """Semantic order, centroid ids and the SVM head all read the training split's inputs: built once."""
    import xmc.train.run as run_module

    calls = []
    build = run_module._train_inputs
    monkeypatch.setattr(run_module, "_train_inputs", lambda *a: calls.append(1) or build(*a))
    overrides = [*SVM_HEAD, *HEAD_TAIL[1:], "classifier.ids=centroid", "classifier.head_jobs=1"]
    config = _config(tmp_path, synth_data, overrides=[*overrides, "train.epochs=1"])
    metrics = run_training(config, str(tmp_path / "run"), progress=False)
    assert len(calls) == 1 and metrics["head_fit_seconds"] > 0


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["encoder.dim=0", "classifier.head_fit=svm"], "classifier.dense_head=0"),
        ([*SVM_HEAD, "classifier.dense_head=60"], "leaves no tail"),
        ([*SVM_HEAD, "classifier.head_c=0"], "head_c must be positive"),
        (SVM_HEAD[1:], "encoder.dim=0"),  # a learned projection: no fixed inputs to solve over
        ([*SVM_HEAD, "classifier.head_fit=newton"], "classifier.head_fit"),
        ([*SVM_HEAD, "classifier.head_jobs=-1"], "classifier.head_jobs"),
    ],
    ids=["no-head", "all-head", "c", "projection", "choice", "jobs"],
)
def test_svm_head_misconfigurations_are_named(tmp_path, synth_data, overrides, problem):
    with pytest.raises(ValueError, match=problem):
        run_training(_config(tmp_path, synth_data, overrides=overrides), str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", [["classifier.type=dense"], HEAD_TAIL], ids=["dense", "head-tail"])
def test_prior_bias_starts_at_the_label_log_odds(tmp_path, synth_data, layout):
    from xmc.data.bow import read_bow

    config = _config(
        tmp_path,
        synth_data,
        overrides=[*layout, "classifier.bias_init=prior", "train.max_steps=1"],
    )
    seen = {}

    def before_the_first_update(model, step, optimizers, scaler):
        clf = model.classifier  # the logits of a zero input are the biases, in label-id order
        bias = clf(torch.zeros(1, clf.in_features)).detach().double().numpy()[0]
        seen.setdefault("bias", bias)

    run_training(config, str(tmp_path / "run"), progress=False, step_hook=before_the_first_update)
    bias = seen["bias"]
    _, Y = read_bow(synth_data / "train.txt")
    p = (np.asarray((Y != 0).sum(0)).ravel() + 0.5) / (Y.shape[0] + 1)
    np.testing.assert_allclose(bias, np.log(p / (1 - p)), rtol=1e-6)


def test_head_tail_in_semantic_order_learns_in_label_ids(tmp_path, synth_data):
    """The dense head holds the most frequent labels and the tail is permuted by the semantic order; the
    predictions still name the right labels (a wrong mapping back to ids would score near chance)."""
    from xmc.data.bow import read_bow

    plain = run_training(
        _config(tmp_path, synth_data, overrides=["train.epochs=4"]), str(tmp_path / "a"), progress=False
    )
    config = _config(tmp_path, synth_data, overrides=["train.epochs=4", *HEAD_TAIL])
    seen = {}
    metrics = run_training(
        config,
        str(tmp_path / "b"),
        progress=False,
        step_hook=lambda model, *_: seen.setdefault("order", model.classifier.order.clone()),
    )
    _, Y = read_bow(synth_data / "train.txt")
    counts = np.asarray((Y != 0).sum(0)).ravel()
    head = set(seen["order"][:10].tolist())
    assert head == set(np.argsort(-counts, kind="stable")[:10].tolist())
    assert not torch.equal(seen["order"][10:], torch.sort(seen["order"][10:]).values)  # permuted tail
    base = metrics["baseline_most_frequent"]["P@1"]
    p1 = metrics["test"]["P@1"]  # measured: 0.55, plain fixed fan-in 0.37, most frequent labels 0.43
    assert p1 > base + 0.05 and p1 > plain["test"]["P@1"], (metrics["test"], plain["test"])
