"""What the training loop asks of the process group: data parallel or label sharding (``train.parallel``).

Every micro-batch of ``train.batch_size`` documents is the *global* batch: each rank takes a contiguous
near-equal part of it. Optimizer steps, schedules, SET rewirings and checkpoints are therefore those of
one process on the same batches, whatever the world size, and a checkpoint resumes at any world size.

- ``data``: the model is replicated and wrapped in ``torch.nn.parallel.DistributedDataParallel``, whose
  forward is :meth:`XMCModel.forward` (the loss), so DDP sees every parameter the loss uses, custom
  autograd functions of the classifiers included, and sums gradient buckets while backward still
  runs. Each rank's loss is weighted by its share of the rows (n_r / n) and DDP's reduction is a sum
  (:func:`_sum_hook`, not DDP's mean), so the summed gradients are those of the single-process loss,
  uneven last batch included. Micro-batches of an accumulation window but the last run under
  ``no_sync``: one reduction per optimizer step, before unscaling and clipping; every rank then takes
  the same step and the same SET rewiring. A rank with no rows of a micro-batch (an uneven last batch)
  runs a stand-in row weighted 0, so it joins the reduction with zero gradients. DDP syncs no buffers
  (``broadcast_buffers=False``): fixed fan-in ids are rewired identically on every rank from keyed
  randomness, and a broadcast per forward would only cost time (gloo cannot even send int16).
- ``labels``: the classifier is split into contiguous label shards (``Classifier.shard``; RPS keeps its
  whole shared array on every rank), everything else is replicated. Each rank encodes its rows, the
  (n, D) classifier input is all-gathered, and each rank computes the loss terms of its labels over
  all n rows, weighted by its share of the labels (L_r / L): the shares sum to the single-process
  mean over n x L pairs. The input gradient is summed back to the rows' owners (a hand-written
  collective, :class:`~xmc.train.distributed.AllGatherRows`: no library shards an output layer by label);
  replicated parameters (encoder, intermediate layer, meta head, RPS array) are DDP's, label shards
  are left out of it (``_set_params_and_buffers_to_ignore_for_model``) and keep their gradients.
  DDP reduces over a process group of its own, so its asynchronous bucket reductions never interleave
  with the all-reduce that the gathered rows' backward runs on the default group. Gradient clipping
  uses the norm over all shards. Top-k merges every rank's top-k lists (ties to the lower label id).
  Per-rank classifier memory falls as 1 / world size.

Checkpoints are written once, by rank 0, in the whole-label layout a single process writes (label
shards and their optimizer state gathered), so they load at any world size; a shard reads only its
rows. At world size 1 every method here is the single-process path.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from xmc.inference.topk import topk_merge_lists_torch
from xmc.losses import Positives
from xmc.model import load_model, save_model
from xmc.runtime import autocast
from xmc.train.checkpoint import load_checkpoint, save_checkpoint
from xmc.train.distributed import (
    AllGatherRows,
    Dist,
    barrier,
    broadcast_,
    gather_rows,
    gather_to_main,
    sum_scalar,
)

MODES = ("data", "labels")


class Parallel:
    """This process's part in a run over ``place.world`` ranks, in ``mode`` ``data`` or ``labels``."""

    def __init__(self, place: Dist | None = None, mode: str = "data") -> None:
        if mode not in MODES:
            raise ValueError(f"train.parallel must be one of {', '.join(MODES)}, got {mode!r}")
        self.place = place or Dist()
        self.mode = mode
        self.num_labels = 0  # the whole classifier's labels (label sharding)
        self.device = torch.device("cpu")
        self.encoder_trains = True
        self.ddp: DistributedDataParallel | None = None  # data parallel over several ranks: the wrapped model

    @property
    def active(self) -> bool:
        return self.place.active

    @property
    def is_main(self) -> bool:
        return self.place.is_main

    @property
    def sharded(self) -> bool:
        """Whether this rank holds a label shard of the classifier."""
        return self.mode == "labels" and self.place.active

    def prepare(self, model, device: torch.device):
        """Shard the classifier (label sharding), move the model to ``device``, and give every rank
        rank 0's replicated tensors (as DDP does; the builds are deterministic, this makes sure)."""
        classifier = model.classifier
        self.num_labels = classifier.num_labels
        if self.sharded:
            if classifier.num_labels < self.place.world:
                raise ValueError(
                    f"{classifier.num_labels} labels cannot be split over {self.place.world} ranks: "
                    "use train.parallel=data"
                )
            model.classifier = classifier.shard(self.place.rank, self.place.world)
            del classifier
        model = model.to(device)
        self.device = device
        self.encoder_trains = bool(model.parameter_groups()[0])
        label = self._label_tensor_ids(model)
        tensors = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in label]
        broadcast_(self.place, tensors)
        if self.active and any(p.requires_grad and id(p) not in label for p in model.parameters()):
            if self.sharded:  # DDP over the replicated parts; the label shards are this module's
                ignore = [f"model.{name}" for name in self.label_state_names(model)]
                self.ddp = wrap_ddp(_ShardedLoss(model, self), device, ignore, dist.new_group())
            else:
                self.ddp = wrap_ddp(model, device)
        return model

    # ---- one micro-batch -------------------------------------------------------------------------

    def rows(self, n: int) -> slice:
        """This rank's rows of a micro-batch of ``n`` documents."""
        return self.place.part(n)

    def batch_rows(self, n: int) -> slice:
        """The rows this rank runs through the model: its own (:meth:`rows`), or under DDP, when it has
        none, in data parallel, the first row as a stand-in that :meth:`loss` weights 0 (DDP needs
        every rank's backward)."""
        part = self.rows(n)
        if self.ddp is not None and not self.sharded and part.start == part.stop:
            return slice(0, 1)
        return part

    def no_sync(self, last: bool):
        """Context for the forward and backward of one micro-batch: under DDP, all micro-batches of an
        accumulation window but the ``last`` accumulate locally (``DistributedDataParallel.no_sync``)."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def loss(
        self,
        model,
        batch: dict[str, torch.Tensor],
        positives: Positives,
        Y,
        rows: np.ndarray,
        kind: str,
        lam: float,
    ) -> torch.Tensor:
        """This rank's share of the mean loss of a micro-batch; the shares sum to the single-process loss.

        ``batch`` and ``positives``: the encoder inputs and labels of this rank's rows (:meth:`rows`,
        possibly none); ``Y[rows]``: CSR (n, L) labels of the whole micro-batch (the same on every rank;
        sliced only under label sharding). Under DDP (several ranks) the loss goes through the DDP
        wrapper's forward, which prepares the reduction of this micro-batch's backward."""
        place, n = self.place, len(rows)
        if not self.sharded:
            if not place.active:
                return model.loss(batch, positives, kind, lam)
            own = place.sizes(n)[place.rank]  # 0 for a stand-in row (:meth:`batch_rows`)
            return self.ddp(batch, positives, kind, lam) * (own / n)
        if self.ddp is not None:
            return self.ddp(batch, positives, Y, rows, kind, lam)
        return self.sharded_loss(model, batch, positives, Y, rows, kind, lam)

    def sharded_loss(self, model, batch, positives: Positives, Y, rows: np.ndarray, kind: str, lam: float):
        """:meth:`loss` under label sharding (the forward of :class:`_ShardedLoss`)."""
        place, n, count = self.place, len(rows), positives.batch_size
        classifier = model.classifier
        h = model.represent(batch)  # (count, D), possibly no rows: its backward still joins the reduce
        if not count and self.encoder_trains and not h.requires_grad:
            h.requires_grad_()
        gathered = AllGatherRows.apply(h, place, place.sizes(n))  # (n, D)
        start = classifier.label_offset
        labels = Positives.from_csr(Y[rows][:, start : start + classifier.num_labels], device=self.device)
        main = classifier.loss(gathered, labels, kind) * (classifier.num_labels / self.num_labels)
        if model.meta is None or lam <= 0:
            return main
        if not count:  # no rows here: the meta head's loss is the other ranks'
            return (1 - lam) * main
        meta = model.meta.loss(h, positives, "bce") * (count / n)
        return (1 - lam) * main + lam * meta

    # ---- one optimizer step ----------------------------------------------------------------------

    def clip_grad_norm_(self, model, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: under label sharding the norm
        includes every rank's shard, so every rank scales by the same factor."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        label = self._label_tensor_ids(model)
        grads = [p.grad for p in params if p.grad is not None]
        shard = [p.grad for p in params if p.grad is not None and id(p) in label]
        replicated = [p.grad for p in params if p.grad is not None and id(p) not in label]
        total = (
            _square_norm(replicated, self.device) + sum_scalar(self.place, _square_norm(shard, self.device))
        ).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batches' loss summed over ranks: the single-process loss (logging, finiteness)."""
        return sum_scalar(self.place, loss)

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler:
        """AMP's loss scaler; under label sharding one that agrees across ranks on overflow (a shard's
        gradient can overflow alone)."""
        if enabled and self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device_type, enabled=True)
        return torch.amp.GradScaler(device_type, enabled=enabled)

    def seed_window(self, seed: int, step: int) -> None:
        """Over several ranks, key the random state (dropout) by (seed, optimizer step, rank): ranks
        draw different masks, and a resumed run draws what the uninterrupted run of the same world size
        would have drawn, without per-rank random states in the checkpoint."""
        if self.place.active:
            torch.manual_seed(int(np.random.SeedSequence([seed, step, self.place.rank]).generate_state(1)[0]))

    # ---- checkpoints -----------------------------------------------------------------------------

    def model_state(self, model) -> dict | None:
        """The whole model's state dict on rank 0 (label shards gathered whole, on CPU), None elsewhere."""
        if not self.sharded:
            return model.state_dict() if self.is_main else None
        names = self.label_state_names(model)
        sizes = self.place.sizes(self.num_labels)
        out = {}
        for key, value in model.state_dict().items():  # the same order on every rank
            if key in names:
                value = gather_to_main(self.place, value, sizes)
            out[key] = value
        return out if self.is_main else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model) -> dict | None:
        """``optimizer.state_dict()`` on rank 0 with the per-slot state of label shards (Adam moments,
        momentum) gathered whole; None elsewhere."""
        state = optimizer.state_dict()
        if not self.sharded:
            return state if self.is_main else None
        sizes = self.place.sizes(self.num_labels)
        for index, param in self._label_params_of(optimizer, model):
            entry = dict(state["state"].get(index, {}))
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape == param.shape:
                    entry[key] = gather_to_main(self.place, value, sizes)
            if index in state["state"]:
                state["state"][index] = entry
        return state if self.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model, state: dict) -> None:
        """Load a whole-label optimizer state (any world size), keeping this shard's rows."""
        if self.sharded:
            start = model.classifier.label_offset
            stop = start + model.classifier.num_labels
            state = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
            for index, param in self._label_params_of(optimizer, model):
                if index not in state["state"]:
                    continue
                entry = dict(state["state"][index])
                for key, value in entry.items():
                    whole = (self.num_labels, *param.shape[1:])
                    if torch.is_tensor(value) and value.dim() >= 1 and value.shape == whole:
                        entry[key] = value[start:stop].clone()
                state["state"][index] = entry
        optimizer.load_state_dict(state)

    def save_checkpoint(self, run_dir, step: int, model, training: dict, wait: bool = True) -> None:
        """Gather (collective under label sharding), then rank 0 writes; with ``wait`` every rank returns
        once it is on disk."""
        state = self.model_state(model)
        if self.is_main:
            save_checkpoint(run_dir, step, state, training)
        if wait:
            barrier(self.place)

    def load_checkpoint(self, folder, model) -> dict:
        return load_checkpoint(folder, model, self._label_rows(model))

    def save_model(self, model, path) -> None:
        state = self.model_state(model)
        if self.is_main:
            save_model(state, path)
        barrier(self.place)

    def load_model(self, model, path) -> None:
        load_model(model, path, self._label_rows(model))

    # ---- prediction ------------------------------------------------------------------------------

    @torch.no_grad()
    def topk_batch(self, model, source, part: np.ndarray, device, precision: str, k: int):
        """Top-k of the documents ``part`` (one batch of :func:`xmc.inference.predict.predict_rows`)
        over the ranks: the batch is split across ranks for the encoder; data parallel gathers the
        ranks' top-k rows, label sharding all-gathers the representations, scores its labels and merges
        every rank's top-k lists. Every rank returns the whole ``(scores, ids)`` of the batch."""
        place = self.place
        n, sizes = len(part), place.sizes(len(part))
        batch = {key: v.to(device, non_blocking=True) for key, v in source.batch(part[self.rows(n)]).items()}
        with autocast(device, precision):
            h = model.represent(batch)
        h = h.float()
        if not self.sharded:
            top_scores, top_ids = model.classifier.topk(h, k)
            return gather_rows(place, top_scores, sizes), gather_rows(place, top_ids, sizes)
        top_scores, top_ids = model.classifier.topk(gather_rows(place, h, sizes), k)  # (n, k) each
        every = [n] * place.world
        all_scores = gather_rows(place, top_scores, every).view(place.world, n, k)
        all_ids = gather_rows(place, top_ids, every).view(place.world, n, k)
        return topk_merge_lists_torch(
            all_scores.permute(1, 0, 2).reshape(n, -1), all_ids.permute(1, 0, 2).reshape(n, -1), k
        )

    # ---- which tensors are label shards ----------------------------------------------------------

    def label_state_names(self, model) -> set[str]:
        """Names in ``model.state_dict()`` of this rank's label-shard tensors (none unless sharded)."""
        if not self.sharded:
            return set()
        return {f"classifier.{name}" for name in model.classifier.label_state_names()}

    def _label_rows(self, model) -> dict[str, slice] | None:
        if not self.sharded:
            return None
        start = model.classifier.label_offset
        rows = slice(start, start + model.classifier.num_labels)
        return {name: rows for name in self.label_state_names(model)}

    def _label_tensor_ids(self, model) -> set[int]:
        if not self.sharded:
            return set()
        classifier = model.classifier
        names = set(classifier.label_state_names())
        named = list(classifier.named_parameters()) + list(classifier.named_buffers())
        return {id(t) for name, t in named if name in names}

    def _label_params_of(self, optimizer, model) -> list[tuple[int, torch.nn.Parameter]]:
        """(index in ``optimizer.state_dict()``, parameter) of the label-shard parameters it updates."""
        label = {id(p) for p in model.classifier.label_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, p) for i, p in enumerate(params) if id(p) in label]


def _sum_hook(group, bucket):
    """DDP communication hook: sum a ``dist.GradBucket`` over ranks; a future of the summed buffer.
    (DDP's own hook averages; the ranks' losses are already weighted by their share of the rows.
    No annotations: DDP checks them, and this module's postponed annotations are strings.)"""
    work = dist.all_reduce(bucket.buffer(), group=group or dist.group.WORLD, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _ShardedLoss(torch.nn.Module):
    """The label-sharded loss as a module whose forward DDP wraps (:meth:`Parallel.sharded_loss`)."""

    def __init__(self, model, par: Parallel) -> None:
        super().__init__()
        self.model, self.par = model, par

    def forward(self, batch, positives, Y, rows, kind: str, lam: float) -> torch.Tensor:
        return self.par.sharded_loss(self.model, batch, positives, Y, rows, kind, lam)


def wrap_ddp(model, device: torch.device, ignore=(), group=None) -> DistributedDataParallel:
    """``model`` (an :class:`~xmc.model.XMCModel` on ``device``, the same on every rank, or a
    :class:`_ShardedLoss`) in ``DistributedDataParallel`` over ``group`` (default: every rank) with a
    summing reduction and no buffer sync; ``ignore``: names of the tensors DDP leaves alone (label
    shards).

    ``find_unused_parameters``: some parameters get no gradient in some steps (the meta head once its
    weight has decayed to 0, a transformer's unused pooler); DDP then leaves their gradient ``None`` on
    every rank, as a single process does, so AdamW leaves them alone."""
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    with warnings.catch_warnings():  # torch >= 2.13 deprecates broadcast_buffers; its replacement
        warnings.simplefilter("ignore", FutureWarning)  # still syncs buffers at init
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
            process_group=group,
        )
    ddp.register_comm_hook(group, _sum_hook)
    return ddp


def _square_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared 2-norm of all ``grads`` together, in fp32."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return norms.square().sum()
