"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder ``ckpt-<step>`` holding ``model.safetensors`` (every parameter and buffer,
fixed fan-in ids included), ``training.pt`` (optimizer, scheduler and scaler states, SET state, RNG
states and the data position; loaded with ``torch.load(weights_only=True)``, so no arbitrary pickled
object is ever executed) and ``meta.json``. It is written under a temporary name and renamed when
complete; then the one-line file ``latest`` is replaced atomically to point at it, and older
checkpoints are removed. A reader follows ``latest`` and so only ever sees a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from xmc.data.atomic import atomic_open
from xmc.model import CheckpointError, damaged, load_model, save_model


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module | dict[str, Any], training: dict[str, Any], keep: int = 1
) -> Path:
    """Write ``run_dir/ckpt-<step>`` completely, point ``latest`` at it, drop all but ``keep`` newest.
    ``model``: the module, or its state dict (see :func:`save_model`)."""
    final, copy = run_dir / f"ckpt-{step:09d}", 0
    while final.exists():  # the same step saved again: a new name, so `latest` always names a whole folder
        copy += 1
        final = run_dir / f"ckpt-{step:09d}-{copy}"
    tmp = run_dir / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, tmp / "model.safetensors")
        torch.save(training, tmp / "training.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
    except Exception as err:  # a full or read-only disk: OSError, or torch's and safetensors' own errors
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{run_dir}: could not write the checkpoint of step {step} ({reason[:200]}); is the disk full "
            "or read-only? The previous checkpoint is intact: free space, then continue with --resume"
        ) from None
    os.replace(tmp, final)
    with atomic_open(run_dir / "latest") as handle:
        handle.write(final.name.encode())
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.exists():
        return None
    folder = run_dir / pointer.read_text().strip()
    return folder if folder.exists() else None


def load_checkpoint(
    folder: Path, model: torch.nn.Module, rows: dict[str, slice] | None = None
) -> dict[str, Any]:
    """Load the model (only ``rows`` of label-indexed tensors, see :func:`load_model`) and return the
    training state; with ``rows`` that state is memory-mapped, so a shard copies only what it keeps."""
    load_model(model, folder / "model.safetensors", rows)
    path = folder / "training.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=bool(rows))
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain data
        raise damaged(path, err, "it holds objects xmc never writes: it was not loaded; retrain") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise damaged(path, err, "this run cannot continue from it: train again in a new --run-dir") from None
