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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmc.data.atomic import atomic_open


class CheckpointError(ValueError):
    """A saved model or checkpoint that cannot be read (truncated, damaged, or not written by xmc)."""


def _damaged(path: Path, err: BaseException, fix: str) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path}: cannot be read, damaged or not written by xmc ({reason[:200]}); {fix}")


def _extra_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".safetensors") + ".extra.json")


def save_model(model: torch.nn.Module | dict[str, Any], path: str | os.PathLike) -> None:
    """``model.state_dict()`` (or a state dict given as is, e.g. label shards gathered whole):
    tensors as safetensors, and modules' extra state (e.g. a bag-of-words vocabulary) as JSON beside it
    (``<name>.extra.json``); each file written atomically."""
    path = Path(path)
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    if extra:
        with atomic_open(_extra_path(path)) as handle:
            handle.write(json.dumps(extra).encode())
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_model(model: torch.nn.Module, path: str | os.PathLike, rows: dict[str, slice] | None = None) -> None:
    """Load weights saved by :func:`save_model`. ``rows`` maps state-dict names to the rows this
    process holds (a label shard loading a whole checkpoint): only those rows are read from disk."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no model weights here (is this a finished or checkpointed run folder?)"
        )
    try:
        if rows:
            with safe_open(str(path), framework="pt") as handle:
                state: dict[str, Any] = {
                    key: handle.get_slice(key)[rows[key]] if key in rows else handle.get_tensor(key)
                    for key in handle.keys()
                }
        else:
            state = dict(load_file(str(path)))
        if _extra_path(path).exists():
            state.update(json.loads(_extra_path(path).read_text()))
    except (OSError, ValueError) as err:
        raise _damaged(path, err, "train again, or resume from a run folder's checkpoint") from None
    except Exception as err:  # safetensors' own error type, which it does not export
        if type(err).__name__ != "SafetensorError":
            raise
        raise _damaged(path, err, "train again, or resume from a run folder's checkpoint") from None
    model.load_state_dict(state)


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
        raise _damaged(path, err, "it holds objects xmc never writes: it was not loaded; retrain") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise _damaged(
            path, err, "this run cannot continue from it: train again in a new --run-dir"
        ) from None
