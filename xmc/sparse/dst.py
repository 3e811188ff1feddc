"""Dynamic sparse training of fixed fan-in layers: SET and RigL rewiring, SRigL neuron ablation.

Every ``interval`` optimizer steps (counted after gradient accumulation) until ``end`` (a fraction of
the total steps), each row of a :class:`~xmc.nn.FixedFanInLinear` drops its weakest connections and
regrows as many at columns it does not hold, so its fan-in stays K:

- prune by ``fraction`` (the ``round(fraction * K)`` smallest |w| of each row; ties to the lower slot)
  or by ``threshold`` (every |w| below it); the active knob decays on a cosine from its initial value
  to ``floor`` at ``end`` (RigL's and SRigL's drop-fraction schedule). A grouped layer (G labels per id
  row, HASTE) judges a group's slot by its |w| summed over the group's labels (the mean, against a
  threshold), and gradient regrowth ranks its columns by the group's summed |gradient|;
- regrow ``random`` (SET): ids are hashes of ``(seed, step, global row, slot)`` (:mod:`xmc.sparse.ids`),
  so a label shard rewires exactly like the same rows of the whole layer; they avoid the ids just
  pruned (when the row has room), so every rewiring explores new columns;
- regrow ``gradient`` (RigL): each row takes the columns it does not hold (after pruning) with the
  largest |dense gradient| of one batch. The gradient comes from ``grad_fn(start, stop)``, asked for
  row chunks only at rewiring steps, so the L x D dense gradient never exists in full. A slot whose
  best remaining column has a zero gradient (no signal: e.g. an input never active in the batch)
  regrows at random as in SET;
- regrown weights start at 0 and their optimizer state (Adam moments, SGD momentum) is reset: stale
  state that belonged to the old connection would push the new one;
- every kept (row, column) pair keeps its weight and optimizer state.

SRigL neuron ablation (``gamma > 0``, an :class:`~xmc.nn.AblatableFixedFanInLinear` only, never the
labels): saliency is judged as unstructured RigL would, over the whole layer: the ``n x K - drops``
largest |w| and the ``drops`` largest |gradient| among absent connections are salient. A neuron with
fewer than ``gamma * K`` salient connections is removed, and the survivors' fan-in becomes
``budget // survivors`` (at most the input width), filled by the same gradient regrowth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from xmc.config import SETOptions, check_options
from xmc.nn.ablation import AblatableFixedFanInLinear
from xmc.nn.fixed_fanin import FixedFanInLinear
from xmc.sparse.ids import REGROW_IDS, fill_distinct

_ROW_CHUNK = 1 << 16
_GRAD_ELEMENTS = 1 << 24  # a gradient row chunk holds at most this many fp32 values (64 MiB)


GradFn = Callable[[int, int], torch.Tensor]


class SET:
    """Rewiring of ``layer`` (SET or RigL regrowth per ``config.regrow``); call :meth:`step` once after
    every optimizer step.

    Args:
        layer: the fixed fan-in layer to rewire (in place).
        total_steps: the run's total optimizer steps (sets ``end`` and the cosine decay).
        config: the schedule (``classifier.set`` of the config); its ``enabled`` is the caller's.
        optimizer: the optimizer (or a list of them) whose per-slot state of ``layer.weight`` is reset
            for regrown slots (optional).
        seed: keys the regrowth randomness; defaults to the layer's seed.
    """

    def __init__(
        self,
        layer: FixedFanInLinear,
        total_steps: int,
        config: SETOptions | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        seed: int | None = None,
    ) -> None:
        self.layer, self.total_steps = layer, total_steps
        self.config = config or SETOptions()
        check_options(self.config, "classifier.set.")
        if self.config.gamma and self.config.regrow != "gradient":
            raise ValueError(
                "neuron ablation (classifier.set.gamma > 0) judges saliency by gradients: "
                "set classifier.set.regrow=gradient"
            )
        if self.config.grad_batches > 1 and self.config.regrow != "gradient":
            raise ValueError(
                f"classifier.set.grad_batches={self.config.grad_batches} sums gradients for regrow=gradient, "
                "but regrowth is random: set classifier.set.regrow=gradient or drop grad_batches"
            )
        if self.config.gamma and not isinstance(layer, AblatableFixedFanInLinear):
            raise ValueError("neuron ablation (gamma > 0) needs an AblatableFixedFanInLinear (never labels)")
        optimizers = [] if optimizer is None else [optimizer] if hasattr(optimizer, "state") else optimizer
        weight = layer.weight
        holders = [o for o in optimizers for g in o.param_groups if any(p is weight for p in g["params"])]
        self.optimizer = holders[0] if holders else None
        self.seed = layer.seed if seed is None else seed
        self.steps = 0  # optimizer steps seen
        self.rewirings = 0

    @property
    def end_step(self) -> int:
        return int(self.config.end * self.total_steps)

    @property
    def needs_gradient(self) -> bool:
        return self.config.regrow == "gradient"

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) rewires."""
        return step % self.config.interval == 0 and step <= self.end_step

    def knob(self, step: int) -> float:
        """The pruning fraction or threshold in force at ``step`` (cosine decay to ``floor``)."""
        cfg = self.config
        start = cfg.fraction if cfg.prune == "fraction" else cfg.threshold
        progress = min(step / max(self.end_step, 1), 1.0)
        return cfg.floor + (start - cfg.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, grad_fn: GradFn | None = None) -> int | None:
        """Count one optimizer step; rewire when one is due. Returns the connections changed, or None.
        ``grad_fn(start, stop)`` gives the (stop - start, D) dense gradient of rows ``start..stop-1``
        (needed by gradient regrowth)."""
        self.steps += 1
        if not self.due(self.steps):
            return None
        return self.rewire(self.steps, grad_fn)

    @torch.no_grad()
    def rewire(self, step: int, grad_fn: GradFn | None = None) -> int:
        """Prune and regrow every row once, keyed by ``step``; returns how many slots were regrown."""
        if self.needs_gradient and grad_fn is None:
            raise ValueError("regrow='gradient' needs grad_fn, the dense gradient of a batch")
        knob = self.knob(step)
        if self.config.gamma:
            changed = self._rewire_ablating(step, knob, grad_fn)
        else:
            changed = self._rewire_rows(step, knob, grad_fn)
        self.rewirings += 1
        return changed

    def _rewire_rows(self, step: int, knob: float, grad_fn: GradFn | None) -> int:
        layer = self.layer
        state = self._slot_states()
        group = layer.group
        num_rows = layer.indices.shape[0]  # id rows: one per label, or one per group of G labels
        # Gradient chunks are (labels, D) fp32: bound them like the random draw's temporaries.
        width = layer.in_features * group
        chunk = max(1, min(_ROW_CHUNK, _GRAD_ELEMENTS // width)) if grad_fn else _ROW_CHUNK
        changed = 0
        for start in range(0, num_rows, chunk):
            stop = min(start + chunk, num_rows)
            lo, hi = start * group, min(stop * group, layer.out_features)  # the id rows' labels
            # A group's slot is judged by its mean magnitude over the group's labels (ranked as the sum).
            magnitude = _group_mean(layer.weight[lo:hi].detach().abs().float(), group)
            prune = self._prune_mask(magnitude, knob)
            if not bool(prune.any()):
                continue
            old, rows = layer.indices[start:stop], layer.global_rows(start, stop)
            if self.needs_gradient:
                grad = grad_fn(lo, hi)
                grad = grad if group == 1 else _group_mean(grad.abs().float(), group)
                ids = self._regrow(old, prune, grad, rows, step, avoid=old)
            else:
                # Avoiding all old ids (kept ones are blocked anyway) keeps regrowth off the ids just pruned.
                key = (self.seed, REGROW_IDS, step)
                ids = fill_distinct(old, prune, rows, layer.in_features, key, avoid=old)
            layer.indices[start:stop] = ids.to(layer.indices.dtype)
            label_prune = prune if group == 1 else prune.repeat_interleave(group, 0)[: hi - lo]
            layer.weight[lo:hi].masked_fill_(label_prune, 0)
            for tensor in state:
                tensor[lo:hi].masked_fill_(label_prune, 0)
            changed += int(label_prune.sum())
        return changed

    def _regrow(
        self,
        ids: torch.Tensor,
        fill: torch.Tensor,
        grad: torch.Tensor,
        rows: torch.Tensor,
        step: int,
        avoid: torch.Tensor,
    ) -> torch.Tensor:
        """``ids`` with its ``fill`` slots set to the absent columns of largest |grad|
        (:func:`grow_by_gradient`); slots left with only zero-gradient columns draw at random, as SET
        (keyed by the global ``rows``), away from the ``avoid`` ids (the row's ids before pruning)."""
        picked, score = grow_by_gradient(ids, fill, grad)
        blind = fill & (score <= 0)
        if not bool(blind.any()):
            return picked
        key = (self.seed, REGROW_IDS, step)
        return fill_distinct(picked, blind, rows, self.layer.in_features, key, avoid=avoid)

    def _rewire_ablating(self, step: int, knob: float, grad_fn: GradFn) -> int:
        """SRigL on a (small) intermediate layer, all rows at once: judge saliency, ablate neurons whose
        salient share is below ``gamma``, widen the survivors to the budget, regrow by gradient."""
        layer: AblatableFixedFanInLinear = self.layer
        num_rows, fan_in = layer.weight.shape
        magnitude = layer.weight.detach().abs().float()
        prune = self._prune_mask(magnitude, knob)
        grad = grad_fn(0, num_rows).float()
        drops = int(prune.sum())
        # Unstructured saliency: the largest |w| the layer keeps in total, the largest |grad| it regrows.
        salient = _top_mask(magnitude, num_rows * fan_in - drops).sum(1)
        if drops:
            absent = grad.abs()
            absent.scatter_(1, layer.indices.long(), -1.0)  # held columns are never "grown"
            salient = salient + _top_mask(absent, drops).sum(1)
        keep = salient >= self.config.gamma * fan_in
        if not bool(keep.any()):
            keep[int(torch.argmax(salient))] = True  # the layer keeps at least its most salient neuron
        survivors = torch.nonzero(keep).squeeze(1)
        new_fan_in = min(layer.in_features, layer.budget // survivors.numel())
        if survivors.numel() == num_rows and new_fan_in == fan_in:
            return self._rewire_rows(step, knob, lambda start, stop: grad[start:stop])
        # Survivors keep their unpruned connections in their slots; the rest of the widened row is regrown.
        widen = new_fan_in - fan_in
        kept = ~prune[survivors]
        fill = torch.nn.functional.pad(~kept, (0, widen), value=True)
        ids = torch.nn.functional.pad(layer.indices[survivors].long(), (0, widen)).masked_fill_(fill, 0)
        old = layer.indices[survivors]
        ids = self._regrow(ids, fill, grad[survivors], layer.neurons[survivors], step, avoid=old)
        slot_map = _slot_remap(survivors, kept, widen)
        for param in [layer.weight] + ([layer.bias] if layer.bias is not None else []):
            remap = slot_map if param is layer.weight else (lambda tensor: tensor[survivors])
            for name, tensor in self._param_states(param):
                self.optimizer.state[param][name] = remap(tensor)
        weight = slot_map(layer.weight.detach())
        bias = layer.bias.detach()[survivors] if layer.bias is not None else None
        layer.set_rows(layer.neurons[survivors], weight, ids, bias)
        return int(fill.sum())

    def _prune_mask(self, magnitude: torch.Tensor, knob: float) -> torch.Tensor:
        if self.config.prune == "threshold":
            return magnitude < knob
        count = int(round(knob * magnitude.shape[1]))
        mask = torch.zeros_like(magnitude, dtype=torch.bool)
        if count:
            # Stable sort: among equal magnitudes the lower slot is pruned first.
            weakest = torch.sort(magnitude, dim=1, stable=True).indices[:, :count]
            mask.scatter_(1, weakest, True)
        return mask

    def _param_states(self, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's per-element state tensors of ``param`` (same shape), by name."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]

    def _slot_states(self) -> list[torch.Tensor]:
        return [tensor for _, tensor in self._param_states(self.layer.weight)]

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "rewirings": self.rewirings,
            "seed": self.seed,
            "total_steps": self.total_steps,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rewirings = int(state["steps"]), int(state["rewirings"])
        self.seed, self.total_steps = int(state["seed"]), int(state["total_steps"])
        self.config = SETOptions(**state["config"])


def grow_by_gradient(
    ids: torch.Tensor, fill: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the ``fill`` slots of each row with the columns it does not hold of largest |grad|.

    Args:
        ids: (R, K) column ids; those where ``fill`` is False are kept (distinct within a row).
        fill: (R, K) bool, the slots to regrow.
        grad: (R, D) dense gradient of the rows.

    Returns:
        ``(ids, score)``: (R, K) int64 ids, where the j-th filled slot of a row (in slot order) holds the
        row's j-th best absent column, and (R, K) float32 |grad| of each filled slot's column (0 elsewhere).
    """
    ids = ids.to(torch.int64)
    scores = grad.detach().abs().float()
    held = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, ~fill)
    scores.masked_fill_(held, -1.0)  # |grad| >= 0, so a held column always ranks last
    need = int(fill.sum(1).max()) if fill.numel() else 0
    if need == 0:
        return ids.clone(), torch.zeros_like(fill, dtype=torch.float32)
    best = torch.topk(scores, need, dim=1)  # (R, need), largest first
    rank = (torch.cumsum(fill.to(torch.int64), dim=1) - 1).clamp(min=0)
    picked = torch.where(fill, torch.gather(best.indices, 1, rank), ids)
    score = torch.where(fill, torch.gather(best.values, 1, rank), 0.0)
    return picked, score


def _group_mean(rows: torch.Tensor, group: int) -> torch.Tensor:
    """(ceil(R / G), C) means of consecutive groups of ``group`` rows of an (R, C) tensor (the last group
    may be short). Within an id row they rank slots as the group's sums do; a threshold keeps its
    per-weight meaning."""
    if group == 1:
        return rows
    pad = -rows.shape[0] % group
    sums = torch.nn.functional.pad(rows, (0, 0, 0, pad)).view(-1, group, rows.shape[1]).sum(1)
    counts = torch.full((sums.shape[0], 1), float(group), device=rows.device)
    counts[-1] = group - pad
    return sums / counts


def _top_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """(same shape) bool marking the ``count`` largest entries of the whole tensor."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        mask[torch.topk(values.reshape(-1), min(count, values.numel())).indices] = True
    return mask.view_as(values)


def _slot_remap(survivors: torch.Tensor, kept: torch.Tensor, widen: int) -> Callable:
    """Maps an (n, K) per-slot tensor to the survivors' (s, K + widen) layout: kept slots keep their
    value, pruned and new slots start at 0."""

    def remap(tensor: torch.Tensor) -> torch.Tensor:
        rows = torch.where(kept, tensor[survivors], torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        return torch.nn.functional.pad(rows, (0, widen))

    return remap
