"""torch.distributed plumbing for data-parallel and label-sharded training.

Runs start under the ecosystem's launchers, ``torchrun`` or ``accelerate launch`` (which runs
``torch.distributed.run`` itself); both describe the process group in the environment: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` joins that group
with NCCL on CUDA and gloo on CPU and pins each process to GPU ``LOCAL_RANK``; without the variables
(a plain ``xmc train``) nothing is initialized and every helper here is the single-process identity.

Rows of a batch and labels of a classifier are split the same way, into near-equal contiguous parts
(:func:`xmc.classifiers.chunked.shard_range`), so every rank knows every part's size without asking and
collectives of uneven parts pad to the largest one. Collectives:

- :class:`AllGatherRows` (autograd): the (n, D) batch from each rank's (n_r, D) rows; backward sums
  d(loss)/d(batch) over ranks and keeps the rank's own rows (label sharding: each rank's loss over its
  labels reads every row);
- :func:`gather_to_main` brings label shards to rank 0's CPU one rank at a time (checkpoints), so no
  device ever holds more than its own shard and one other.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xmc.classifiers.chunked import shard_range
from xmc.runtime import resolve_device

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a slow rank (e.g. a checkpoint)
# Dtypes gloo does not reduce or send; they travel as int32.
_WIRE = {torch.int8: torch.int32, torch.int16: torch.int32, torch.uint8: torch.int32, torch.bool: torch.int32}


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sizes(self, n: int) -> list[int]:
        """Rows (or labels) of every rank when ``n`` are split into contiguous near-equal parts."""
        return [stop - start for start, stop in (shard_range(n, r, self.world) for r in range(self.world))]

    def part(self, n: int) -> slice:
        """This rank's part of ``n`` rows (or labels)."""
        return slice(*shard_range(n, self.rank, self.world))


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the launcher's process group (if any); returns this process's place and its device.

    ``device`` is ``train.device``: ``auto`` takes CUDA when present. Under a launcher with CUDA, rank
    ``r`` uses GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo. Without a launcher: ``Dist()`` and the device.
    """
    want_cuda = resolve_device(device).type == "cuda"
    if not launched():
        return Dist(), torch.device("cuda" if want_cuda else "cpu")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start "
            "multi-process runs with `torchrun --nproc_per_node N -m xmc train ...` or `accelerate launch`"
        )
    place = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if want_cuda:
        if place.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {place.local_rank} has no GPU (this node has {torch.cuda.device_count()}): "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(place.local_rank)
        where = torch.device("cuda", place.local_rank)
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=TIMEOUT)
    if dist.get_world_size() != place.world or dist.get_rank() != place.rank:
        raise RuntimeError("the initialized process group does not match RANK / WORLD_SIZE")
    return place, where


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(place: Dist) -> None:
    if place.active:
        dist.barrier()


def broadcast_object(place: Dist, value):
    """Rank 0's ``value`` on every rank (small picklable objects: a run folder's name)."""
    if not place.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    return t.to(_WIRE[t.dtype]) if t.dtype in _WIRE else t


def broadcast_(place: Dist, tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values, in place."""
    if not place.active:
        return
    for t in tensors:
        wire = _to_wire(t.detach()).contiguous()  # the tensor itself when it can travel as it is
        dist.broadcast(wire, src=0)
        if wire.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(wire)


def sum_scalar(place: Dist, value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a 0-d tensor (a new tensor; the input is left alone)."""
    if not place.active:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def gather_rows(place: Dist, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows ``x`` ((sizes[rank], ...)) concatenated in rank order on every rank."""
    if not place.active:
        return x
    if x.shape[0] != sizes[place.rank]:
        raise ValueError(f"rank {place.rank} holds {x.shape[0]} rows, expected {sizes[place.rank]}")
    widest = max(sizes)
    wire = _to_wire(x.detach())
    padded = wire.new_zeros((widest, *x.shape[1:]))
    padded[: x.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(place.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(x.dtype)


class AllGatherRows(torch.autograd.Function):
    """:func:`gather_rows` with a backward: the gradient of the gathered (n, D) batch is summed over
    ranks (each rank's loss reads every row) and the rank keeps its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, place: Dist, sizes: list[int]) -> torch.Tensor:
        ctx.place, ctx.sizes = place, sizes
        return gather_rows(place, x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        place, sizes = ctx.place, ctx.sizes
        grad = grad.contiguous()
        if place.active:
            dist.all_reduce(grad)
        start = sum(sizes[: place.rank])
        return grad[start : start + sizes[place.rank]], None, None


def gather_to_main(place: Dist, x: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """Rank 0 gets every rank's rows ``x`` ((sizes[rank], ...)) concatenated on CPU; others get None.

    Point to point, one rank at a time: the receiving device holds one other shard at a time."""
    if not place.active:
        return x.detach().cpu()
    wire = _to_wire(x.detach()).contiguous()
    if not place.is_main:
        if sizes[place.rank]:
            dist.send(wire, dst=0)
        return None
    parts = [x.detach().cpu()]
    for rank in range(1, place.world):
        if not sizes[rank]:
            continue
        buffer = torch.empty((sizes[rank], *x.shape[1:]), dtype=wire.dtype, device=x.device)
        dist.recv(buffer, src=rank)
        parts.append(buffer.to("cpu", x.dtype))
    return torch.cat(parts)
