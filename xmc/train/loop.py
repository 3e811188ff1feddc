"""The training loop: one flat function over micro-batches, optimizer steps and evaluations.

Steps, in order: micro-batches of ``batch_size`` documents (order: a permutation keyed by (seed,
epoch), so a resumed run sees the same batches), ``grad_accum`` of them per optimizer step; the
gradients are unscaled (fp16), clipped, and checked: a non-finite gradient skips the step (weights,
ids and optimizer state untouched; fp16 lowers the loss scale), and ``MAX_BAD_STEPS`` non-finite
steps in a row stop the run with the last good checkpoint intact. After each optimizer step the
schedules advance and the fixed fan-in layers rewire when due
(:mod:`xmc.sparse.rewiring`). Every ``eval_every`` epochs the dev split is scored, the
best model by ``select`` (dev P@1 unless set) is kept in ``best.safetensors``, and a checkpoint is
written; ``patience`` evaluations without improvement stop training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmc.config import Config
from xmc.losses import Positives
from xmc.optim import LowPrecisionAdamW
from xmc.progress import bars
from xmc.runtime import autocast, peak_memory_label
from xmc.sparse.rewiring import Rewiring
from xmc.train.checkpoint import latest_checkpoint
from xmc.train.recipe import Recipe

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 3  # non-finite optimizer steps in a row that stop a run
MAX_BAD_STEPS_FP16 = 25  # fp16 halves its loss scale at each overflow: allow it to come down first


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN); the message says why and what to change."""


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    micro: int = 0  # next micro-batch of the epoch
    step: int = 0  # optimizer steps done
    best: float = -1.0  # best dev value of the select metric
    select: str = "P@1"  # train.select of the run: the metric that best holds
    evals_since_best: int = 0
    skipped: int = 0
    history: list = field(default_factory=list)
    epoch_loss: float = 0.0  # sum of the current epoch's step losses so far (its mean goes to history)
    epoch_steps: int = 0  # steps applied in the current epoch so far
    examples: int = 0  # documents seen, over every session of the run (resumes included)
    train_seconds: float = 0.0  # time in the training loop, over every session of the run


def _schedule(warmup: float, total: int):
    warm = max(1, int(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def build_optimizers(config: Config, model, num_labels: int | None = None) -> list[torch.optim.Optimizer]:
    """AdamW for the encoder side; AdamW or SGD (momentum 0.9) for the classifier side.

    ``num_labels``: L of the whole layer (default: the model's classifier's; a label shard passes the whole
    layer's). The loss is a mean over all B x L pairs (:mod:`xmc.losses`), so a logit's gradient is
    1 / L of what it is under a sum over labels. AdamW does not see that (its update is divided by the
    gradient's own scale); SGD would take steps L times too small, so its classifier learning rate is per
    label: its parameter group runs at ``lr * L`` with weight decay ``wd / L`` (``lr_scale`` = L; the
    meta head's at ``lr * K`` over its K clusters), which is plain SGD on the loss summed over labels and
    averaged over documents: the same step, and the same decay ``lr * wd`` per step, at any L.

    The fused implementations (CPU and CUDA) update each tensor in one pass without temporaries: the
    for-each / per-tensor paths allocate a copy of the parameters they update (``sqrt`` of the second
    moment), which at millions of labels is gigabytes on top of the optimizer state.
    """
    t = config.train
    encoder_params, classifier_params = model.parameter_groups()
    optimizers = []
    if encoder_params:
        optimizers.append(
            torch.optim.AdamW(
                encoder_params,
                lr=t.encoder_lr,
                weight_decay=t.encoder_weight_decay,
                fused=_fusable(encoder_params),
            )
        )
    if t.classifier_state == "bf16":
        if t.classifier_optimizer != "adamw":
            raise ValueError(
                "train.classifier_state=bf16 keeps AdamW moments in bf16: "
                "set train.classifier_optimizer=adamw"
            )
        optimizers.append(
            LowPrecisionAdamW(
                classifier_params,
                lr=t.classifier_lr,
                weight_decay=t.classifier_weight_decay,
                seed=config.seed,
            )
        )
    elif t.classifier_optimizer == "sgd":
        optimizers.append(
            torch.optim.SGD(
                _per_label_groups(model, t.classifier_lr, t.classifier_weight_decay, num_labels),
                lr=t.classifier_lr,
                momentum=0.9,
                weight_decay=t.classifier_weight_decay,
                fused=_fusable(classifier_params),
            )
        )
    else:
        optimizers.append(
            torch.optim.AdamW(
                classifier_params,
                lr=t.classifier_lr,
                weight_decay=t.classifier_weight_decay,
                fused=_fusable(classifier_params),
            )
        )
    return optimizers


def _per_label_groups(model, lr: float, weight_decay: float, num_labels: int | None) -> list[dict]:
    """SGD parameter groups of the classifier side whose learning rate is per label (see
    :func:`build_optimizers`): the classifier's scaled by L, the meta head's by its cluster count."""
    trained = [p for p in model.classifier.parameters() if p.requires_grad]  # not a frozen SVM head
    scaled = [(trained, num_labels or model.classifier.num_labels)]
    if getattr(model, "meta", None) is not None:
        scaled.append((list(model.meta.parameters()), model.meta.num_clusters))
    return [
        {"params": params, "lr": lr * n, "weight_decay": weight_decay / n, "lr_scale": n}
        for params, n in scaled
        if params
    ]


def _fusable(params) -> bool | None:
    """Whether the fused optimizer kernels serve these parameters (floating point, CPU or CUDA)."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def train(recipe: Recipe, resume: bool = False) -> Position:
    """Train ``recipe.model`` in place (see :class:`~xmc.train.recipe.Recipe` for what it holds), from the
    run folder's last checkpoint when ``resume``; returns the final position."""
    config, model, data, inputs = recipe.config, recipe.model, recipe.data, recipe.inputs
    run_dir, device, precision, par = recipe.run_dir, recipe.device, recipe.precision, recipe.parallel
    meta_weight_fn, progress, step_hook = recipe.meta_weight, recipe.progress, recipe.step_hook
    t = config.train
    train_split = data.splits["train"]
    train_inputs = inputs[train_split.source]
    n = len(train_split.rows)
    micro_per_epoch = math.ceil(n / t.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    optimizers = build_optimizers(config, model, train_split.Y.shape[1])
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _schedule(t.warmup, total_steps)) for o in optimizers]
    scaler = par.grad_scaler(device.type, enabled=precision == "fp16")
    rewiring = Rewiring(config, model, total_steps, optimizers)
    pos = Position(select=t.select)
    if resume and (folder := latest_checkpoint(run_dir)) is not None:
        state = par.load_checkpoint(folder, model)  # whole-label layout: any world size resumes it
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            par.load_optimizer_state(o, model, s)
        for s, st in zip(schedulers, state["schedulers"], strict=True):
            s.load_state_dict(st)
        scaler.load_state_dict(state["scaler"])
        if rewiring:
            rewiring.load_state_dict(state["dst"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        pos = Position(**state["position"])  # a run from before train.select takes the default, P@1
        if pos.select != t.select and pos.best >= 0:
            raise ValueError(
                f"{run_dir} keeps its best model by dev {pos.select} and this config asks for {t.select}: "
                f"resume with train.select={pos.select}, or start a new run to select by {t.select}"
            )
        pos.select = t.select
        log.info("resumed from %s at epoch %d, step %d", folder, pos.epoch, pos.step)

    def rng_states() -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def checkpoint(rng: tuple[torch.Tensor, torch.Tensor | None] | None = None, wait: bool = True) -> None:
        """Save at an optimizer-step boundary; ``rng`` is the random state to resume with (default: now);
        ``wait``: other ranks wait until it is written (not when interrupted: they may be gone)."""
        cpu_rng, cuda_rng = rng if rng is not None else rng_states()
        state = {
            "optimizers": [par.optimizer_state(o, model) for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "scaler": scaler.state_dict(),
            "dst": rewiring.state_dict(),
            "rng": cpu_rng,
            "cuda_rng": cuda_rng,
            "position": vars(pos),
        }
        par.save_checkpoint(run_dir, pos.step, model, state, wait)  # shards gathered; rank 0 writes

    params = [p for g in model.parameter_groups() for p in g]
    interrupted = False
    # Between the first optimizer update of a step and the end of its bookkeeping (and from an epoch's
    # end to its checkpoint), weights, optimizer state and position disagree: a checkpoint taken then
    # would resume from a state no uninterrupted run passes through. An interrupt there saves nothing;
    # the last checkpoint stays, and resuming from it is exact.
    midway = False
    stop = StopRequest(defer=not par.active)  # Ctrl-C / SIGTERM: finish the step, then stop
    writer = _tensorboard(run_dir) if par.is_main else None
    interactive = par.is_main and bars(progress)
    logged = _EpochLog(micro_per_epoch) if progress and par.is_main and not interactive else None
    bad_in_a_row = 0
    window_rng = None
    examples, started, seconds_before = pos.examples, time.perf_counter(), pos.train_seconds
    examples_before = examples
    # The epoch's running loss sum, on the device (no host sync per step); a resumed epoch goes on from
    # its saved sum.
    epoch_loss = torch.tensor(pos.epoch_loss, dtype=torch.float32, device=device)
    saved = None  # (epoch, micro, step) of the last checkpoint this session wrote

    def totals() -> None:
        """The position's documents and training time over every session, this one up to now (a session
        that trained nothing, e.g. --resume of a finished run, adds no time)."""
        pos.examples = examples
        if examples > examples_before:
            pos.train_seconds = seconds_before + time.perf_counter() - started

    def rate() -> float:
        """This session's documents a second (a resumed run's earlier documents took earlier time)."""
        return (examples - examples_before) / max(time.perf_counter() - started, 1e-9)

    def save(rng=None, wait: bool = True) -> None:
        """Bring the position's totals up to now and checkpoint, unless nothing moved since the last."""
        nonlocal saved
        if (pos.epoch, pos.micro, pos.step) == saved:
            return
        pos.epoch_loss = float(epoch_loss)
        totals()
        checkpoint(rng, wait)
        saved = (pos.epoch, pos.micro, pos.step)

    try:
        stop.install()
        while pos.epoch < t.epochs and not (t.max_steps and pos.step >= t.max_steps):
            order = np.random.default_rng([config.seed, pos.epoch]).permutation(n)
            bar = tqdm(
                total=micro_per_epoch,
                initial=pos.micro,
                desc=f"epoch {pos.epoch + 1}/{t.epochs}",
                unit="batch",
                disable=not interactive,
                leave=False,
                dynamic_ncols=True,
            )
            model.train()
            while pos.micro < micro_per_epoch and not (t.max_steps and pos.step >= t.max_steps):
                if stop.requested:
                    raise KeyboardInterrupt  # at a step boundary: the checkpoint below is exact
                window = range(pos.micro, min(pos.micro + t.grad_accum, micro_per_epoch))
                window_rng = rng_states()  # a window cut short is redone from this random state
                par.seed_window(config.seed, pos.step)  # several ranks: dropout keyed by (step, rank)
                loss_sum = torch.zeros((), device=device)
                for micro in window:
                    local = order[micro * t.batch_size : (micro + 1) * t.batch_size]
                    mine = local[par.batch_rows(len(local))]  # this rank's part of the (global) micro-batch
                    batch = {
                        k: v.to(device, non_blocking=True)
                        for k, v in train_inputs.batch(train_split.rows[mine]).items()
                    }
                    positives = Positives.from_csr(train_split.Y[mine], device=device)
                    lam = meta_weight_fn(pos.epoch + micro / micro_per_epoch) if meta_weight_fn else 0.0
                    keep = micro == window[-1] and rewiring.wants_batch()  # for gradient regrowth
                    capture = rewiring.capture(positives) if keep else contextlib.nullcontext()
                    with capture, par.no_sync(last=micro == window[-1]):  # DDP: reduce on the last only
                        with autocast(device, precision):
                            loss = par.loss(model, batch, positives, train_split.Y, local, t.loss, lam)
                        loss = loss / len(window)
                        scaler.scale(loss).backward()
                        loss_sum += loss.detach()
                    examples += len(local)
                if step_hook is not None:
                    step_hook(model, pos.step, optimizers, scaler)
                for o in optimizers:
                    scaler.unscale_(o)
                norm = par.clip_grad_norm_(model, params, t.clip_grad_norm or float("inf"))
                loss_sum = par.reduce_loss(loss_sum)
                finite = bool(torch.isfinite(norm) & torch.isfinite(loss_sum))  # the step's one host sync
                midway = True
                if finite:
                    for o in optimizers:
                        scaler.step(o)
                    for s in schedulers:
                        s.step()
                    pos.step, pos.micro, bad_in_a_row = pos.step + 1, window.stop, 0
                    epoch_loss += loss_sum
                    pos.epoch_steps += 1
                    rewiring.step()
                else:
                    pos.skipped, pos.micro, bad_in_a_row = pos.skipped + 1, window.stop, bad_in_a_row + 1
                scaler.update()  # lowers the fp16 scale after an overflow
                window_rng = None  # the window is done: the current random state is the one to resume with
                midway = False
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                bar.update(len(window))
                if bad_in_a_row >= (MAX_BAD_STEPS_FP16 if precision == "fp16" else MAX_BAD_STEPS):
                    last = latest_checkpoint(run_dir)
                    kept = (
                        f"the last good checkpoint ({last.name}) in {run_dir} is intact "
                        "(resume with --resume)"
                        if last is not None
                        else "no checkpoint had been written yet: start again"
                    )
                    raise TrainingError(
                        f"the loss or gradient was not finite for {bad_in_a_row} optimizer steps in a row "
                        f"(last at step {pos.step}): lower train.classifier_lr / train.encoder_lr, keep "
                        f"train.clip_grad_norm on, or use train.precision=no; {kept}"
                    )
                if finite and pos.step % 20 == 0:
                    value = float(loss_sum)
                    bar.set_postfix(loss=f"{value:.4g}", ex_s=f"{rate():.0f}", mem=peak_memory_label(device))
                    if writer is not None:
                        writer.add_scalar("train/loss", value, pos.step)
                        group = optimizers[-1].param_groups[0]  # its lr as configured (per label for SGD)
                        writer.add_scalar(
                            "train/lr_classifier", group["lr"] / group.get("lr_scale", 1), pos.step
                        )
                if logged is not None:
                    logged.maybe(pos, t.epochs, epoch_loss, rate())
                if t.save_every and finite and pos.step % t.save_every == 0:
                    save()
            bar.close()
            early_stop = False
            midway = True
            if pos.micro >= micro_per_epoch:
                pos.epoch, pos.micro = pos.epoch + 1, 0
                # One host sync per epoch for the logged loss (mean over the epoch's applied steps).
                pos.history.append(
                    {
                        "epoch": pos.epoch,
                        "step": pos.step,
                        "train_loss": float(epoch_loss) / max(pos.epoch_steps, 1),
                    }
                )
                if rewiring:  # SET rewirings so far, every fixed fan-in layer (plots mark them per epoch)
                    pos.history[-1]["rewirings"] = rewiring.rewirings
                epoch_loss, pos.epoch_steps = torch.zeros_like(epoch_loss), 0
                log.info(
                    "epoch %d/%d: step %d, train loss %.4g",
                    pos.epoch,
                    t.epochs,
                    pos.step,
                    pos.history[-1]["train_loss"],
                )
                if "dev" in data.splits and (pos.epoch % t.eval_every == 0 or pos.epoch == t.epochs):
                    early_stop = _evaluate(recipe, pos, writer)
            save()
            midway = False
            if early_stop:
                log.info("stopping early: dev %s has not improved for %d evaluations", t.select, t.patience)
                break
    except KeyboardInterrupt:
        interrupted = True
        if par.sharded:  # gathering the label shards needs every rank, and they may be gone
            log.warning(
                "interrupted: continue from the last checkpoint with: xmc train --resume --run-dir %s",
                run_dir,
            )
        elif midway:
            last = latest_checkpoint(run_dir)
            log.warning(
                "interrupted in the middle of an optimizer step: nothing saved; %s",
                f"continue from {last.name} with: xmc train --resume --run-dir {run_dir}"
                if last is not None
                else "no checkpoint had been written yet",
            )
        else:
            # At the last completed optimizer step; a half-done window is redone with the same dropout.
            save(window_rng, wait=False)
            log.warning(
                "interrupted: checkpoint saved in %s; continue with: xmc train --resume --run-dir %s",
                run_dir,
                run_dir,
            )
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
    if interrupted:
        raise KeyboardInterrupt
    if "dev" not in data.splits or not (run_dir / "best.safetensors").exists():
        par.save_model(model, run_dir / "best.safetensors")  # without validation the final model is the best
    if saved != (pos.epoch, pos.micro, pos.step):  # else the totals are those of the last checkpoint
        totals()
    pos.history.append({"train_seconds": pos.train_seconds, "examples": pos.examples})
    return pos


def _evaluate(recipe: Recipe, pos: Position, writer) -> bool:
    """Score dev, keep the best model; True when early stopping should end training."""
    config, par, run_dir = recipe.config, recipe.parallel, recipe.run_dir
    metrics = recipe.evaluate(recipe.data.splits["dev"])
    score = metrics[config.train.select]
    pos.history[-1].update({f"dev/{k}": v for k, v in metrics.items()})
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"dev/{key}", value, pos.step)
    improved = score > pos.best
    shown = ", ".join(
        f"{key} {100 * metrics[key]:.2f}" for key in dict.fromkeys(("P@1", "P@3", "P@5", config.train.select))
    )
    log.info("epoch %d: dev %s%s", pos.epoch, shown, f" (best {config.train.select})" if improved else "")
    if improved:
        pos.best, pos.evals_since_best = score, 0
        par.save_model(recipe.model, run_dir / "best.safetensors")
    else:
        pos.evals_since_best += 1
    return bool(config.train.patience) and pos.evals_since_best >= config.train.patience


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while training.

    In a single process the first signal only sets :attr:`requested`: the loop finishes the optimizer
    step in progress and stops at the next step boundary, where its checkpoint is exact. A second
    signal raises KeyboardInterrupt at once. Several processes (``defer=False``) raise at once, as their
    ranks could otherwise stop at different steps and wait for each other forever.
    """

    def __init__(self, defer: bool = True) -> None:
        self.defer = defer
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or os.name != "posix":
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested or not self.defer:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after the current optimizer step (interrupt again to stop at once)")


class _EpochLog:
    """When stderr is not a terminal (a log file, a batch job), a few plain log lines per epoch in
    place of a progress bar, which would write every refresh into the log."""

    LINES_PER_EPOCH = 4

    def __init__(self, micro_per_epoch: int) -> None:
        self.every = max(1, micro_per_epoch // self.LINES_PER_EPOCH)
        self.micro_per_epoch = micro_per_epoch
        self.last = -1

    def maybe(self, pos: Position, epochs: int, epoch_loss: torch.Tensor, rate: float) -> None:
        mark = pos.micro // self.every
        if mark == self.last or pos.micro >= self.micro_per_epoch or pos.micro < self.every:
            return
        self.last = mark
        log.info(
            "epoch %d/%d: %d/%d batches, step %d, mean loss %.4g, %.0f examples/s",
            pos.epoch + 1,
            epochs,
            pos.micro,
            self.micro_per_epoch,
            pos.step,
            float(epoch_loss) / max(pos.epoch_steps, 1),  # a host sync, a few times an epoch
            rate,
        )
