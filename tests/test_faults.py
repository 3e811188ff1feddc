"""Faults a hostile user finds: Ctrl-C at any moment, huge k, damaged files, bad config values, two runs
in one folder. Each test names the probe it answers (docs/faults.md lists the promises)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import xmc
from xmc.cli import main
from xmc.config import ConfigError, load_config
from xmc.data import FormatError, read_bow
from xmc.data.split import read_split
from xmc.data.synth import SynthOptions, synthesize
from xmc.train.lock import RunLock
from xmc.train.run import run_training

CONFIG = """
data: {{train: '{train}', test: '{test}', labels: '{labels}', format: lf-json, dev_fraction: 0.2}}
encoder: {{type: bow, dim: 16, min_df: 1, dropout: 0.1}}
classifier: {{type: fixed_fanin, fan_in: 6, set: {{interval: 4, fraction: 0.3}}}}
train: {{epochs: 2, batch_size: 40, encoder_lr: 0.01, classifier_lr: 0.03, eval_batch_size: 64,
         warmup: 0.0, save_every: 3}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out,
        SynthOptions(
            num_labels=30,
            num_train=300,
            num_test=60,
            labels_per_doc=2,
            exponent=0.8,
            num_features=200,
            format="both",
            noise_words=4,
            seed=2,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def config_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(
        CONFIG.format(train=data / "trn.json.gz", test=data / "tst.json.gz", labels=data / "lbl.json.gz")
    )
    return path


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """An uninterrupted run: its metrics and its best model. 240 train rows: 6 steps an epoch, 12 in all."""
    run = tmp_path_factory.mktemp("reference") / "run"
    metrics = run_training(load_config(config_file), str(run), progress=False)
    return metrics, load_file(str(run / "best.safetensors"))


@pytest.fixture(scope="module")
def finished_run(reference, config_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    run_training(load_config(config_file), str(run), progress=False)
    return run


def _interrupt_after_update(n: int, how: str):
    """A global optimizer post-step hook: right after the n-th optimizer update (counting every optimizer
    of the model), raise KeyboardInterrupt there (``raise``) or send this process SIGINT (``signal``,
    as Ctrl-C does)."""
    calls = {"n": 0}

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    return register_optimizer_step_post_hook(hook)


def _same_run(got: dict, got_model: dict, want: dict, want_model: dict) -> None:
    assert got["optimizer_steps"] == want["optimizer_steps"]
    assert got["history"] == want["history"]  # dev metrics and the epochs' mean train loss, exactly
    assert got["test"] == want["test"]
    assert got_model.keys() == want_model.keys()
    for name in want_model:
        assert torch.equal(got_model[name], want_model[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "signal"])
def test_interrupt_after_any_optimizer_update_resumes_bit_identical(tmp_path, config_file, reference, how):
    """Probe 1: Ctrl-C right after an optimizer update, then --resume, ended elsewhere than an uninterrupted
    run. Two optimizers (encoder, classifier) step per optimizer step: 24 updates in 12 steps; every one is
    interrupted in turn (``raise``: a KeyboardInterrupt at that very point; ``signal``: a real SIGINT,
    which lets the step finish and checkpoints at its end)."""
    want, want_model = reference
    updates = range(1, 25) if how == "raise" else range(1, 25, 3)
    for n in updates:
        run = tmp_path / f"cut-{n}"
        handle = _interrupt_after_update(n, how)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_training(load_config(config_file), str(run), progress=False)
        finally:
            handle.remove()
        if how == "signal":  # the step in progress finished and was saved: steps = ceil(n / 2)
            assert (run / "latest").read_text().startswith(f"ckpt-{(n + 1) // 2:09d}"), n
        if (run / "latest").exists():
            got = run_training(load_config(run / "config.yaml"), str(run), resume=True, progress=False)
        else:  # interrupted before the first checkpoint: nothing to resume, and no folder left behind
            assert not run.exists()
            got = run_training(load_config(config_file), str(run), progress=False)
        _same_run(got, load_file(str(run / "best.safetensors")), want, want_model)


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_whole_checkpoint(tmp_path, config_file, reference):
    """A first SIGINT lets the step finish; a second one stops at once, mid-update: nothing is saved then
    (the checkpoint of step 3 stays, not one labelled 3 holding part of step 4), and resuming is exact."""
    calls = {"n": 0}
    before = signal.getsignal(signal.SIGINT)

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # step 4's encoder update, before its classifier update
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(hook)
    run = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(load_config(config_file), str(run), progress=False)
    finally:
        handle.remove()
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    assert (run / "latest").read_text() == "ckpt-000000003"  # save_every=3
    got = run_training(load_config(config_file), str(run), resume=True, progress=False)
    _same_run(got, load_file(str(run / "best.safetensors")), *reference)


def test_resuming_a_finished_run_keeps_its_metrics(finished_run, config_file):
    """Probe 11: --resume of a finished run rewrote metrics.json with 0 examples/s."""
    before = json.loads((finished_run / "metrics.json").read_text())
    assert main(["train", "--run-dir", str(finished_run), "--resume", "--no-progress"]) == 0
    after = json.loads((finished_run / "metrics.json").read_text())
    assert after["examples_per_second"] == pytest.approx(before["examples_per_second"], rel=0.05)
    assert after["examples_per_second"] > 0 and after["test"] == before["test"]
    assert after["history"] == before["history"]


def test_a_resumed_run_logs_the_speed_of_its_own_session(tmp_path, config_file, caplog):
    """The examples/s a resumed run logged counted the documents of the sessions before it as well
    (3,906 examples/s logged just after resuming a 51 examples/s run). Steps here take at least 50 ms,
    so no true rate exceeds 40 documents / 0.05 s = 800 a second."""
    run = tmp_path / "run"
    handle = _interrupt_after_update(20, "signal")  # step 10 of 12: 400 documents before the resume
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(load_config(config_file), str(run), progress=False)
    finally:
        handle.remove()
    with caplog.at_level(logging.INFO, logger="xmc.train.loop"):
        run_training(
            load_config(run / "config.yaml"),
            str(run),
            resume=True,
            progress=True,  # not a terminal under pytest: plain log lines
            step_hook=lambda *args: time.sleep(0.05),
        )
    rates = [
        float(r.getMessage().split(", ")[-1].split()[0]) for r in caplog.records if "examples/s" in r.message
    ]
    assert rates and max(rates) <= 800


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, config_file):
    """Probe 11: failed runs left half-made folders."""
    bad = tmp_path / "bad.txt"
    bad.write_text("2 5 3\n0 1:1.0\n1 2:x\n")
    run = tmp_path / "runs" / "r"
    argv = ["train", "--no-progress", "--config", str(config_file), "--run-dir", str(run)]
    assert main([*argv, f"data.train={bad}", "data.format=auto", "data.test=null"]) == 2
    assert not run.exists()


def test_divergence_without_a_checkpoint_does_not_claim_one(tmp_path, config_file, capsys):
    """Probe 11: the divergence message claimed a checkpoint that does not exist."""

    def poison(model, step, optimizers, scaler):
        model.classifier.layer.weight.grad.fill_(float("nan"))

    config = load_config(config_file, ["train.save_every=0"])
    from xmc.train.loop import TrainingError

    with pytest.raises(TrainingError, match="no checkpoint had been written yet") as err:
        run_training(config, str(tmp_path / "run"), progress=False, step_hook=poison)
    assert "is intact" not in str(err.value)


# ---- probe 2 and 10: prediction ----------------------------------------------------------------------


def test_k_above_the_label_count_costs_what_k_equal_to_it_costs(finished_run):
    """Probe 2: memory grew with k, not L (k = 10**9 was killed at 21 GB)."""
    model = xmc.load(finished_run, device="cpu")
    tracemalloc.start()
    out = model.predict(["w1 w2 w3"], k=10**12)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(out[0]) == model.num_labels == 30
    assert peak < 20 * 2**20, peak
    assert [name for name, _ in out[0][:5]] == [name for name, _ in model.predict(["w1 w2 w3"], k=5)[0]]


def test_cli_predict_with_huge_and_small_k(finished_run, data, tmp_path, capsys):
    """Probes 2 and 4: --k 10**12 failed with MemoryError; --k 1..4 on labelled input wrote the file and
    then exited 2 because its metrics asked for P@5."""
    out = tmp_path / "p.npz"
    args = ["predict", "--run", str(finished_run), "--input", str(data / "tst.json.gz"), "--out", str(out)]
    assert main([*args, "--k", str(10**12)]) == 0
    assert np.load(out)["indices"].shape == (60, 30)
    for k in (1, 2, 3, 4):
        capsys.readouterr()
        assert main([*args, "--k", str(k)]) == 0, k
        printed = capsys.readouterr().out
        assert np.load(out)["indices"].shape == (60, k)
        assert "P" in printed and ("@5" in printed) is False and "@1" in printed


@pytest.mark.parametrize(
    "texts, k, error, fragment",
    [
        ("wine", 5, TypeError, "single string"),
        ([None], 5, TypeError, "document 0 is NoneType"),
        (["ok", 123], 5, TypeError, "document 1 is int"),
        (42, 5, TypeError, "list of strings"),
        (["wine"], -1, ValueError, "k must be at least 1"),
        (["wine"], 0, ValueError, "k must be at least 1"),
        (["wine"], 2.5, TypeError, "k must be a positive integer"),
    ],
)
def test_predict_says_what_it_expects(finished_run, texts, k, error, fragment):
    """Probe 10: a bare string became one-character documents; [None] and [123] raised AttributeError;
    k=-1 a NumPy error."""
    model = xmc.load(finished_run, device="cpu")
    with pytest.raises(error, match=fragment):
        model.predict(texts, k=k)


# ---- probes 3, 5, 6, 7: one-line errors and config values ----------------------------------------------


def _one_line_error(capsys, argv: list[str], fragment: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_os_and_decoding_faults_are_one_line(tmp_path, data, config_file, finished_run, capsys, monkeypatch):
    """Probe 3: each of these printed a traceback."""
    train = ["train", "--no-progress", "--config", str(config_file), "--run-dir", str(tmp_path / "r")]
    whole = (data / "trn.json.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    _one_line_error(capsys, [*train, f"data.train={tmp_path / 'cut.txt.gz'}"], "gzip file is truncated")
    (tmp_path / "fake.txt.gz").write_bytes((data / "train.txt").read_bytes())
    _one_line_error(capsys, [*train, f"data.train={tmp_path / 'fake.txt.gz'}"], "not a valid gzip file")
    (tmp_path / "huge.txt").write_text(f"{2**64} 5 3\n")
    as_bow = ["data.format=auto", "data.labels=null", "data.test=null"]
    _one_line_error(capsys, [*train, f"data.train={tmp_path / 'huge.txt'}", *as_bow], "too large a count")
    (tmp_path / "folder").mkdir()
    _one_line_error(capsys, [*train, f"data.train={tmp_path / 'folder'}", *as_bow], "is a folder, not a file")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "folder")], "is a folder, not a YAML file")
    (tmp_path / "afile").write_text("x")
    _one_line_error(
        capsys, ["train", "--config", str(config_file), "--run-dir", str(tmp_path / "afile")], "is a file"
    )
    (tmp_path / "bad.yaml").write_text("train: {epochs: 2\n")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml")], "not valid YAML")
    _one_line_error(capsys, ["train", "--config", str(config_file), "train.epochs=[2"], "not valid YAML")

    # A read-only run folder (as root, permissions do not stop writes: the error is raised for it).
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "ro" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    _one_line_error(
        capsys, ["train", "--config", str(config_file), "--run-dir", str(tmp_path / "ro" / "r")], "permission"
    )
    monkeypatch.undo()

    # A full disk while checkpointing: torch.save raises its own RuntimeError.
    def full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    _one_line_error(
        capsys,
        ["train", "--no-progress", "--config", str(config_file), "--run-dir", str(tmp_path / "full")],
        "is the disk full",
    )
    monkeypatch.undo()

    # A truncated model, a truncated checkpoint, a crafted checkpoint.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    best = copy / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    predict = [
        "predict",
        "--run",
        str(copy),
        "--input",
        str(data / "tst.json.gz"),
        "--out",
        str(tmp_path / "p.npz"),
    ]
    _one_line_error(capsys, predict, "cannot be read")
    checkpoint = copy / (copy / "latest").read_text() / "training.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    _one_line_error(capsys, ["train", "--run-dir", str(copy), "--resume"], "cannot be read")
    torch.save({"run": os.system}, checkpoint)  # a pickled callable: never executed, refused
    _one_line_error(capsys, ["train", "--run-dir", str(copy), "--resume"], "objects xmc never writes")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=-1", "train.epochs must be at least 1, got -1"),
        ("train.epochs=0", "train.epochs must be at least 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
        ("train.batch_size=-4", "train.batch_size must be at least 1, got -4"),
        ("encoder.dropout=1.5", "encoder.dropout must be in [0, 1)"),
        ("train.classifier_lr=.nan", "train.classifier_lr must be at least 0"),
    ],
)
def test_config_values_out_of_range_are_refused(tmp_path, config_file, capsys, override, fragment):
    """Probe 5: epochs -1 / 0 exited 0 with an untrained model's metrics; batch_size 0 divided by zero."""
    _one_line_error(
        capsys, ["train", "--config", str(config_file), "--run-dir", str(tmp_path / "r"), override], fragment
    )
    assert not (tmp_path / "r").exists()


def test_numbers_in_exponent_form_are_numbers(tmp_path, config_file):
    """Probe 6: YAML 1.1 reads 3e-2 and 1e6 as strings, and they were refused."""
    config = load_config(
        config_file, ["train.classifier_lr=3e-2", "train.max_steps=1e6", "train.encoder_lr=5E-5"]
    )
    assert config.train.classifier_lr == 0.03 and config.train.max_steps == 1_000_000
    assert config.train.encoder_lr == 5e-5
    path = tmp_path / "c.yaml"
    path.write_text("train: {classifier_lr: 3e-2, max_steps: 1e3, warmup: .5}\n")
    config = load_config(path)
    assert (config.train.classifier_lr, config.train.max_steps, config.train.warmup) == (0.03, 1000, 0.5)
    # YAML 1.1 reads no as false: the choice "no" is meant (the README's own train.precision=no).
    assert load_config(config_file, ["train.precision=no"]).train.precision == "no"
    path.write_text("train: {precision: no}\n")
    assert load_config(path).train.precision == "no"
    for bad in ("train.max_steps=1.5e3x", "train.max_steps=2.5"):
        with pytest.raises(ConfigError, match="must be int"):
            load_config(config_file, [bad])


def test_overrides_mix_with_options_in_any_order(tmp_path, config_file):
    """Probe 7: an override after an option was "unrecognized arguments"."""
    run = tmp_path / "r"
    argv = ["train", "train.max_steps=2", "--config", str(config_file), "--no-progress", "train.epochs=1"]
    assert main([*argv, "--run-dir", str(run), "train.eval_batch_size=32"]) == 0
    saved = load_config(run / "config.yaml")
    assert (saved.train.max_steps, saved.train.epochs, saved.train.eval_batch_size) == (2, 1, 32)


# ---- probe 8: one run per folder ------------------------------------------------------------------------


def test_a_second_run_in_a_busy_folder_is_refused(tmp_path, config_file, capsys):
    """Probe 8: two runs in one folder both ran; one crashed loading the other's model."""
    run = tmp_path / "r"
    run.mkdir()
    with RunLock(run):  # as a first run would hold it
        _one_line_error(
            capsys,
            ["train", "--no-progress", "--config", str(config_file), "--run-dir", str(run)],
            "is in use by another xmc run (pid",
        )
    assert main(["train", "--no-progress", "--config", str(config_file), "--run-dir", str(run)]) == 0


def test_two_processes_into_one_folder(tmp_path, config_file):
    """Two real `xmc train` processes started together: one trains, the other is refused at once."""
    run = tmp_path / "r"
    command = [sys.executable, "-m", "xmc", "train", "--no-progress", "--config", str(config_file)]
    procs = [
        subprocess.Popen([*command, "--run-dir", str(run)], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another xmc run" in refused or "already holds a run" in refused
    assert (run / "metrics.json").exists()


# ---- probes 9, 11 (split labels), 13 ------------------------------------------------------------------


def test_values_beyond_float32_are_refused_with_file_and_line(tmp_path):
    """Probe 9: 1e40 became inf with a warning, and training silently skipped steps."""
    path = tmp_path / "big.txt"
    path.write_text("2 4 3\n0 1:0.5\n1 2:1e40\n")
    with pytest.raises(FormatError, match=r"big.txt, line 3: value '1e40'.*overflows float32"):
        read_bow(path)
    path.write_text("2 4 3\n0 1:0.5 2:-3e38\n1 2:1e38\n")  # within float32: read
    assert read_bow(path)[0].data.max() == np.float32(1e38)


def test_split_label_file_errors_speak_of_labels(tmp_path):
    """Probe 11: a split label file with a bad header reported a feature id."""
    (tmp_path / "X.txt").write_text("2 5\n0:1.0\n1:1.0\n")
    (tmp_path / "Y.txt").write_text("2 3\n0:1\n7:1\n")
    with pytest.raises(FormatError, match="Y.txt, line 3: label id 7 out of range"):
        read_split(tmp_path / "X.txt", tmp_path / "Y.txt")


def test_progress_off_a_terminal_is_a_few_log_lines(tmp_path, config_file):
    """Probe 13: with stderr redirected to a file, tqdm wrote every refresh into it."""
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "xmc",
                "train",
                "--config",
                str(config_file),
                "--run-dir",
                str(tmp_path / "r"),
            ],
            stderr=handle,
            stdout=subprocess.DEVNULL,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    assert "epoch 1/2: step 6, train loss" in text and "epoch 2/2: step 12, train loss" in text
    assert "epoch 1/2: 3/6 batches" in text  # a few lines within each epoch
