"""Data-parallel and label-sharded training over torch.distributed, on CPU with 2 gloo processes.

The multi-process tests start the processes the way the README tells users to: ``torchrun`` (run as
``python -m torch.distributed.run``, the same program) and ``accelerate launch``. Each compares a
2-process run with a single-process run on the same global batches, at every optimizer step, across
SET rewirings (``tests/dist_worker.py`` records loss, whole gradients and whole model state).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker  # tests/ is on sys.path (pytest's pythonpath setting)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xmc.classifiers import DenseClassifier, FixedFanInClassifier
from xmc.classifiers.chunked import shard_range
from xmc.config import load_config
from xmc.inference.topk import topk_dense, topk_merge_lists_torch, topk_merge_torch
from xmc.train.distributed import Dist
from xmc.train.parallel import Parallel
from xmc.train.run import run_training

WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"
REPO = Path(__file__).resolve().parents[2]
# Every (mode, classifier) pair, plus checkpoints written at world size 2 (save_) and resumed at 2 from
# a single-process checkpoint (resume_).
CASES = ("data_dense", "data_fixed", "labels_dense", "labels_fixed", "labels_rps")
SAVED = ("labels_fixed", "data_fixed")
RESUMED = ("labels_fixed", "labels_dense")
# fp32 tolerances: gradients are sums in another order; parameters then go through a few AdamW steps.
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    """``torchrun --nproc_per_node 2 ...`` (``python -m torch.distributed.run`` is the same program)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] + [
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]


def _launch(command: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XMC_CACHE": str(cache)}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The 2-process records of every case (one launch), beside single-process references."""
    root = tmp_path_factory.mktemp("dist")
    data, out = root / "data", root / "out"
    dist_worker.write_data(data)
    out.mkdir()
    for base in RESUMED:  # single-process runs killed at step 5: their checkpoints hold step 4
        partial = data / f"partial-{base}"
        dist_worker.run_case(f"save_{base}", data, partial, crash=True)
        shutil.copytree(partial, data / f"resume-{base}")
    cases = [*CASES, *(f"save_{b}" for b in SAVED), *(f"resume_{b}" for b in RESUMED)]
    _launch(_torchrun(str(WORKER), str(data), str(out), *cases), REPO, root / "cache")
    two = {case: torch.load(out / f"{case}.pt", weights_only=False) for case in cases}
    one = {case: dist_worker.run_case(case, data, root / f"one-{case}") for case in CASES}
    return data, out, one, two


def _close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    try:
        torch.testing.assert_close(got, want, **tol)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def _assert_states_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if value.is_floating_point():
            _close(got[key], value, PARAM_TOL, f"{what} {key}")
        else:  # fixed fan-in ids: the same rewiring, exactly
            assert torch.equal(got[key], value), f"{what} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_at_every_step(worlds, case):
    _, _, one, two = worlds
    want, got = one[case], two[case]
    assert len(want["losses"]) == len(got["losses"]) >= 6
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    assert sorted(got["grads"]) == sorted(want["grads"])
    for step in want["grads"]:
        for name, grad in want["grads"][step].items():
            _close(got["grads"][step][name], grad, GRAD_TOL, f"step {step} gradient of {name}")
        _assert_states_close(got["states"][step], want["states"][step], f"step {step}")
    _assert_states_close(got["final"], want["final"], "final")
    if case.endswith("fixed"):  # SET rewired during the run (at steps 2 and 4; later the knob rounds to 0)
        ids = [s["classifier.layer.indices"] for s in want["states"].values()]
        assert sum(not torch.equal(a, b) for a, b in zip(ids, ids[1:], strict=False)) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ddp_wraps_the_replicated_parameters(worlds, case):
    """Over 2 ranks DistributedDataParallel reduces every replicated trainable parameter (the whole
    model in data parallel, all but the label shards under label sharding), and the hand-written
    gradient sum is never called; a single process has no wrapper."""
    _, _, one, two = worlds
    got = two[case]
    assert one[case]["ddp"] is None
    assert got["ddp"]["wrapper"] == "DistributedDataParallel"
    replicated = [name for name in got["trainable"] if name not in got["label_shards"]]
    assert got["ddp"]["reduced"] == replicated
    assert bool(got["label_shards"]) == case.startswith("labels")
    if "meta.classifier.weight" in replicated:  # no gradient in the first epoch (meta weight 0), then one
        grads = got["grads"]
        assert any(not grads[step]["meta.classifier.weight"].any() for step in grads)
        assert any(grads[step]["meta.classifier.weight"].any() for step in grads)


def _checkpoint(run: Path) -> tuple[dict, dict]:
    folder = run / (run / "latest").read_text().strip()
    return load_file(folder / "model.safetensors"), torch.load(folder / "training.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("base", SAVED)
def test_checkpoint_saved_at_world_size_2_is_whole_and_resumes_at_1(worlds, base):
    data, out, one, _ = worlds
    run = out / f"run-save_{base}"
    assert (run / "latest").read_text().strip().startswith("ckpt-000000004")  # step 4, maybe saved twice
    model, training = _checkpoint(run)
    # The whole-label layout a single process writes, optimizer state included.
    if base == "labels_fixed":
        reference = data / f"partial-{base}"
        want_model, want_training = _checkpoint(reference)
        _assert_states_close(model, want_model, "checkpoint model")
        for got_o, want_o in zip(training["optimizers"], want_training["optimizers"], strict=True):
            for index, entry in want_o["state"].items():
                for key, value in entry.items():
                    _close(got_o["state"][index][key], value, PARAM_TOL, f"optimizer state {key}")
        clock = ("train_seconds",)  # wall time, the one entry that may differ
        drop = lambda position: {k: v for k, v in position.items() if k not in clock}  # noqa: E731
        assert drop(training["position"]) == drop(want_training["position"])
        assert training["dst"] == want_training["dst"]
    assert model["classifier.layer.weight"].shape == (dist_worker.NUM_LABELS, 3)
    moments = training["optimizers"][-1]["state"]
    assert any(v["exp_avg"].shape == (dist_worker.NUM_LABELS, 3) for v in moments.values())
    resumed = dist_worker.run_case(f"save_{base}", data, run, resume=True)
    _assert_states_close(resumed["final"], one[base]["final"], "resumed at world size 1")


@pytest.mark.slow
@pytest.mark.parametrize("base", RESUMED)
def test_single_process_checkpoint_resumes_at_world_size_2(worlds, base):
    _, _, one, two = worlds
    got = two[f"resume_{base}"]
    assert min(got["states"]) == dist_worker.CRASH_AT - 1  # resumed after step 4
    _assert_states_close(got["final"], one[base]["final"], "resumed at world size 2")


@pytest.mark.parametrize("world, k", [(2, 5), (3, 7), (4, 30)])
def test_sharded_topk_merge_equals_the_single_process_topk(world, k):
    """Per-rank top-k lists of contiguous label shards merge into the global top-k: random integer
    scores (many ties, to the lower id), -inf and NaN included; k above a shard's size pads."""
    rng = np.random.default_rng(world)
    rows, labels = 40, 53
    scores = rng.integers(-3, 4, (rows, labels)).astype(np.float32)
    scores[rng.random((rows, labels)) < 0.05] = -np.inf
    scores[rng.random((rows, labels)) < 0.05] = np.nan
    want_scores, want_ids = topk_dense(scores, k)
    lists_s, lists_i = [], []
    for rank in range(world):
        start, stop = shard_range(labels, rank, world)
        empty_s = torch.full((rows, k), float("-inf"))
        empty_i = torch.full((rows, k), -1, dtype=torch.int64)
        s, i = topk_merge_torch(empty_s, empty_i, torch.from_numpy(scores[:, start:stop]), start, k)
        lists_s.append(s)
        lists_i.append(i)
    got_s, got_i = topk_merge_lists_torch(torch.cat(lists_s, 1), torch.cat(lists_i, 1), k)
    np.testing.assert_array_equal(got_i.numpy(), want_ids)
    np.testing.assert_array_equal(got_s.numpy(), want_scores)


@pytest.mark.parametrize("kind", ["dense", "fixed_fanin"])
def test_classifier_shards_topk_merges_to_the_whole_classifiers(kind):
    """Small integers make every score exact, so ties between shards are exact ties."""
    torch.manual_seed(0)
    whole = DenseClassifier(6, 29) if kind == "dense" else FixedFanInClassifier(6, 29, 2, seed=1)
    with torch.no_grad():  # repeated rows (label 0 in shard 0, labels 10-19 in shard 1) tie everywhere
        weight = whole.weight if kind == "dense" else whole.layer.weight
        bias = whole.bias if kind == "dense" else whole.layer.bias
        weight.copy_(torch.randint(-2, 3, weight.shape))
        bias.copy_(torch.randint(-2, 3, bias.shape))
        weight[10:20] = weight[0]
        bias[10:20] = bias[0]
        if kind == "fixed_fanin":
            whole.layer.indices[10:20] = whole.layer.indices[0]
    h = torch.randint(-3, 4, (9, 6)).float()
    want = whole.topk(h, 12)
    parts = [whole.shard(rank, 3).topk(h, 12) for rank in range(3)]
    got = topk_merge_lists_torch(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 12)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_a_single_process_parallel_is_the_plain_path():
    """World size 1: the rows are the whole batch, nothing is weighted or sharded."""
    par = Parallel(Dist(), "labels")
    assert not par.sharded and not par.active and par.is_main
    assert par.rows(7) == slice(0, 7)
    assert Dist(1, 3).part(10) == slice(4, 7) and Dist(0, 3).sizes(2) == [1, 1, 0]
    with pytest.raises(ValueError, match="train.parallel"):
        Parallel(Dist(), "model")


def _e2e_config(tmp_path: Path, data: Path, classifier: str, parallel: str) -> Path:
    path = tmp_path / f"{classifier}-{parallel}.yaml"
    path.write_text(
        f"data: {{train: {data / 'train.txt'}, test: {data / 'test.txt'}, dev_fraction: 0.25, format: bow}}\n"
        "encoder: {type: bow, dim: 8, dropout: 0.0}\n"
        f"classifier: {{type: {classifier}, fan_in: 3, set: {{interval: 2, fraction: 0.34}}}}\n"
        "train: {epochs: 2, batch_size: 12, encoder_lr: 0.05, classifier_lr: 0.1, warmup: 0.0, "
        f"precision: 'no', device: cpu, eval_batch_size: 8, parallel: {parallel}}}\n"
        "seed: 3\n"
    )
    return path


def _check_e2e(proc, tmp_path: Path, config: Path, run: Path) -> None:
    """Written once, by rank 0, and what a single process gets on the same config."""
    assert proc.stdout.count("run: ") == 1  # one report
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file
    assert len(list(run.glob("ckpt-*"))) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    single = run_training(load_config(config), str(tmp_path / "single"), progress=False)
    assert metrics["optimizer_steps"] == single["optimizer_steps"]
    assert metrics["test"]["P@1"] == pytest.approx(single["test"]["P@1"])
    _assert_states_close(
        load_file(run / "best.safetensors"), load_file(tmp_path / "single" / "best.safetensors"), "best"
    )
    want = np.load(tmp_path / "single" / "predictions.npz")["indices"]
    np.testing.assert_array_equal(np.load(run / "predictions.npz")["indices"], want)


@pytest.mark.slow
def test_xmc_train_under_torchrun_data_parallel_dense(tmp_path):
    dist_worker.write_data(tmp_path / "data")
    config = _e2e_config(tmp_path, tmp_path / "data", "dense", "data")
    run = tmp_path / "run"
    command = _torchrun("-m", "xmc", "train", "--config", str(config), "--run-dir", str(run), "--no-progress")
    proc = _launch(command, tmp_path, tmp_path / "cache")
    _check_e2e(proc, tmp_path, config, run)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["labels", "data"])
def test_xmc_train_under_accelerate_launch_fixed_fanin(tmp_path, parallel):
    if shutil.which("accelerate") is None and not _has_module("accelerate"):
        pytest.skip("accelerate is not installed")
    dist_worker.write_data(tmp_path / "data")
    config = _e2e_config(tmp_path, tmp_path / "data", "fixed_fanin", parallel)
    run = tmp_path / "run"
    # `accelerate launch --multi_gpu` runs torch.distributed.run; on a machine without GPUs the processes
    # find no CUDA and train on CPU over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    command += ["-m", "xmc", "train", "--config", str(config), "--run-dir", str(run), "--no-progress"]
    proc = _launch(command, tmp_path, tmp_path / "cache")
    _check_e2e(proc, tmp_path, config, run)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_memory_planner_per_rank_classifier_falls_as_one_over_world_size(tmp_path, capsys):
    from xmc.cli import main
    from xmc.memory.planner import ENCODERS, Plan, estimate

    def classifier(plan: Plan, name: str, part: str) -> int:
        return estimate(plan, (name,))[name][f"classifier {part}"]

    one = Plan(labels=100_000, encoder=ENCODERS["bert-tiny"], fan_in=16, batch=8, seq_len=16)
    for world in (2, 4, 8):
        labels = Plan(**{**vars(one), "world_size": world})
        data = Plan(**{**vars(one), "world_size": world, "parallel": "data"})
        for name in ("dense", "fixed_fanin"):  # label-indexed: exactly the largest shard's share
            assert classifier(labels, name, "weights") == classifier(one, name, "weights") // world
            assert classifier(data, name, "weights") == classifier(one, name, "weights")
        # RPS replicates its array (sized by the whole L x D), only the bias is split.
        assert classifier(labels, "rps", "weights") == classifier(one, "rps", "weights") - 4 * (
            100_000 - 100_000 // world
        )
        encoder = estimate(labels, ("dense",))["dense"]["encoder parameters"]
        assert encoder == estimate(one, ("dense",))["dense"]["encoder parameters"]
    # A config's batch_size is the global batch: 4 ranks of 12 documents each for batch_size 48.
    dist_worker.write_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: {tmp_path / 'train.txt'}}}\ntrain: {{batch_size: 48}}\n")
    command = ["memory", "--config", str(config), "--world-size", "4", "--json", "--backends", "dense"]
    assert main(command) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["batch"], plan["labels_per_rank"], plan["parallel"]) == (12, 6, "labels")
    assert main(["memory", "--labels", "1000", "--world-size", "4", "--parallel", "data"]) == 0
    assert "data parallel over 4" in capsys.readouterr().out
