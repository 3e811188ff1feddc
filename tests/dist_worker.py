"""Multi-process training cases for tests/train/test_parallel.py, and the same cases in one process.

Under a launcher (``torchrun --nproc_per_node 2 tests/dist_worker.py DATA OUT CASE...``) every rank runs
each case through the real loop (:func:`xmc.train.loop.train`) and rank 0 writes ``OUT/<case>.pt``:
per optimizer step the loss, the whole gradients (label shards gathered) and the whole model state
(fixed fan-in ids included) as the step starts, then the final state. The test computes the same
records in its own process (world size 1) and compares.

A case is a name: ``<mode>_<classifier>`` (modes ``data`` / ``labels``, classifiers ``dense`` / ``fixed``
/ ``rps``), ``save_<base>`` (train ``<base>`` with checkpoints every 2 steps and crash at step 5:
its run folder keeps step 4), or ``resume_<base>`` (resume ``<base>`` from ``DATA/resume-<base>``,
written by a single-process ``save_<base>`` run that crashed, and train to the end).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xmc.config import Config, build
from xmc.data import write_bow
from xmc.encoders import build_encoder_and_inputs
from xmc.model import build_model
from xmc.train.data import load_data
from xmc.train.distributed import gather_to_main, setup
from xmc.train.loop import train
from xmc.train.parallel import Parallel
from xmc.train.recipe import Recipe

NUM_DOCS, NUM_FEATURES, NUM_LABELS = 37, 40, 23  # odd sizes: uneven row and label shards
CRASH_AT = 5  # save_ / partial runs stop at this step; checkpoints every 2 steps leave step 4


class Crash(RuntimeError):
    """Stands in for a killed process."""


def write_data(folder: Path, seed: int = 0) -> None:
    """Tiny bag-of-words ``train.txt`` (37 documents) and ``test.txt`` (15) with 1-3 labels and 2-6
    features per document; a label's features overlap, so there is something to learn."""
    rng = np.random.default_rng(seed)
    signature = rng.integers(0, NUM_FEATURES, (NUM_LABELS, 3))
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", NUM_DOCS), ("test.txt", 15)):
        X = sp.lil_matrix((docs, NUM_FEATURES), dtype=np.float32)
        Y = sp.lil_matrix((docs, NUM_LABELS), dtype=np.float32)
        for i in range(docs):
            labels = rng.choice(NUM_LABELS, rng.integers(1, 4), replace=False)
            Y[i, labels] = 1
            for f in {*signature[labels[0]][: rng.integers(1, 4)], *rng.choice(NUM_FEATURES, 3)}:
                X[i, f] = rng.integers(1, 4)
        write_bow(folder / name, X.tocsr(), Y.tocsr())


def case_config(case: str, data: Path) -> Config:
    """The config of a case: batch 12 over 37 documents leaves a last micro-batch of one document
    (one rank gets no rows); SET rewires every 2 steps; clipping bites; no dropout."""
    base = case.removeprefix("save_").removeprefix("resume_")
    mode, kind = base.split("_")
    classifier = {"type": {"fixed": "fixed_fanin"}.get(kind, kind), "fan_in": 3}
    classifier["set"] = {"interval": 2, "fraction": 0.34, "end": 0.8}
    classifier["rps"] = {"compression": 2.0}
    accum = 1
    if kind == "dense":  # the replicated extras: an intermediate layer and the meta head
        classifier.update(intermediate=6, meta={"enabled": True, "clusters": 4})
        accum = 2
    raw = {
        "data": {"train": str(data / "train.txt"), "dev_fraction": 0.0, "format": "bow"},
        "encoder": {"type": "bow", "dim": 8, "dropout": 0.0},
        "classifier": classifier,
        "train": {
            "epochs": 3,
            "batch_size": 12,
            "grad_accum": accum,
            "loss": "bce" if kind != "fixed" else "squared_hinge",
            "encoder_lr": 0.05,
            "classifier_lr": 0.1,
            "warmup": 0.0,
            "clip_grad_norm": 0.15 if kind == "dense" else 0.4,  # bites at some steps
            "precision": "no",
            "device": "cpu",
            "save_every": 2 if case != base else 0,
            "parallel": mode,
        },
        "seed": 3,
    }
    return build(Config, raw, "")


class RecordingParallel(Parallel):
    """Keeps the loss of every optimizer step (the sum over ranks the loop uses)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        total = super().reduce_loss(loss)
        self.losses.append(float(total))
        return total


def ddp_coverage(par: Parallel, model) -> dict | None:
    """What wraps the model for gradient reduction: the wrapper's class and the names (in ``model``) of
    the parameters it reduces; None without a wrapper."""
    if par.ddp is None:
        return None
    ignored = set(par.ddp.parameters_to_ignore)
    prefix = "" if par.ddp.module is model else "model."
    reduced = [
        name.removeprefix(prefix)
        for name, p in par.ddp.module.named_parameters()
        if p.requires_grad and name not in ignored
    ]
    return {"wrapper": type(par.ddp).__name__, "reduced": sorted(reduced)}


def whole_gradients(par: Parallel, model) -> dict[str, torch.Tensor] | None:
    """Every parameter's gradient on rank 0, label shards gathered; None elsewhere."""
    names = par.label_state_names(model)
    sizes = par.place.sizes(par.num_labels)
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = gather_to_main(par.place, grad, sizes) if name in names else grad.detach().clone()
    return out if par.is_main else None


def run_case(
    case: str, data: Path, run_dir: Path, place=None, resume: bool = False, crash: bool = False
) -> dict | None:
    """Train one case (``crash``: stop at step ``CRASH_AT`` as if killed); the records on rank 0."""
    config = case_config(case, data)
    torch.manual_seed(config.seed)
    par = RecordingParallel(place, config.train.parallel)
    loaded = load_data(config.data, config.seed)
    encoder, inputs = build_encoder_and_inputs(config.encoder, loaded.sources, progress=False)
    clusters = np.arange(loaded.num_labels) % 4 if config.classifier.meta.enabled else None
    model = par.prepare(build_model(config, encoder, loaded.num_labels, clusters), torch.device("cpu"))
    records: dict = {"steps": {}, "grads": {}, "states": {}, "ddp": ddp_coverage(par, model)}
    records["trainable"] = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    records["label_shards"] = sorted(par.label_state_names(model))

    def hook(model, step, optimizers, scaler):
        grads = whole_gradients(par, model)
        state = par.model_state(model)
        if par.is_main:
            records["grads"][step] = grads
            records["states"][step] = {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}
        if crash and step == CRASH_AT:
            raise Crash(f"crash at step {step}")

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        recipe = Recipe(
            config,
            model,
            loaded,
            inputs,
            run_dir,
            torch.device("cpu"),
            "no",
            par,
            # 0 in the first epoch: the meta head gets no gradient there (None on every rank, as in one
            # process, so AdamW leaves it alone)
            meta_weight=(lambda epochs: 0.3 if epochs >= 1 else 0.0) if model.meta is not None else None,
            progress=False,
            step_hook=hook,
        )
        train(recipe, resume=resume)
    except Crash:
        pass
    final = par.model_state(model)
    if not par.is_main:
        return None
    records["losses"] = par.losses
    records["final"] = {k: v.detach().clone() for k, v in final.items() if torch.is_tensor(v)}
    return records


def main(argv: list[str]) -> int:
    data, out, cases = Path(argv[0]), Path(argv[1]), argv[2:]
    place, _ = setup("cpu")
    for case in cases:
        if case.startswith("resume_"):  # from a crashed single-process run
            base = case.removeprefix("resume_")
            records = run_case(f"save_{base}", data, data / f"resume-{base}", place, resume=True)
        else:
            records = run_case(case, data, out / f"run-{case}", place, crash=case.startswith("save_"))
        if place.is_main:
            torch.save(records, out / f"{case}.pt")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
