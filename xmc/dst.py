"""Dynamic sparse training of fixed fan-in layers: SET rewiring.

Every ``interval`` optimizer steps (counted after gradient accumulation) until ``end`` (a fraction of
the total steps), each row of a :class:`~xmc.nn.FixedFanInLinear` drops its weakest connections and
regrows as many at random columns it does not hold, so its fan-in stays K:

- prune by ``fraction`` (the ``round(fraction * K)`` smallest |w| of each row; ties to the lower slot)
  or by ``threshold`` (every |w| below it); the active knob decays on a cosine from its initial value
  to ``floor`` at ``end``;
- regrown ids are hashes of ``(seed, step, global row, slot)`` (:mod:`xmc.nn.ids`), so a label shard
  rewires exactly like the same rows of the whole layer; they avoid the ids just pruned (when the row
  has room), so every rewiring explores new columns;
- regrown weights start at 0 and their optimizer state (Adam moments, SGD momentum) is reset: stale
  state that belonged to the old connection would push the new one;
- every kept (row, column) pair keeps its weight and optimizer state.

All of it is vectorized over rows, in row chunks that bound the temporaries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from xmc.nn.fixed_fanin import FixedFanInLinear
from xmc.nn.ids import REGROW_IDS, fill_distinct

_ROW_CHUNK = 1 << 16


@dataclass
class SETConfig:
    """SET schedule. Defaults follow the SPARTEX settings for large label sets."""

    interval: int = 800  # optimizer steps between rewirings; shorter = more exploration, more noise
    end: float = 0.66  # stop rewiring after this fraction of the total steps, so the final ids settle
    prune: str = "fraction"  # "fraction" (same count every row) or "threshold" (|w| below a bound)
    fraction: float = 0.25  # share of each row pruned per rewiring (prune="fraction")
    threshold: float = 0.01  # magnitude bound (prune="threshold")
    floor: float = 1e-4  # the active knob decays on a cosine to this value at `end`

    def __post_init__(self) -> None:
        if self.prune not in ("fraction", "threshold"):
            raise ValueError(f"prune must be 'fraction' or 'threshold', got {self.prune!r}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if not 0 <= self.end <= 1:
            raise ValueError(f"end is a fraction of the training steps in [0, 1], got {self.end}")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.threshold < 0 or self.floor < 0:
            raise ValueError("threshold and floor must be non-negative")


class SET:
    """SET rewiring of ``layer``; call :meth:`step` once after every optimizer step.

    Args:
        layer: the fixed fan-in layer to rewire (in place).
        total_steps: the run's total optimizer steps (sets ``end`` and the cosine decay).
        config: the schedule.
        optimizer: whose per-slot state of ``layer.weight`` is reset for regrown slots (optional).
        seed: keys the regrowth randomness; defaults to the layer's seed.
    """

    def __init__(
        self,
        layer: FixedFanInLinear,
        total_steps: int,
        config: SETConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int | None = None,
    ) -> None:
        self.layer, self.total_steps = layer, total_steps
        self.config = config or SETConfig()
        self.optimizer = optimizer
        self.seed = layer.seed if seed is None else seed
        self.steps = 0  # optimizer steps seen
        self.rewirings = 0

    @property
    def end_step(self) -> int:
        return int(self.config.end * self.total_steps)

    def knob(self, step: int) -> float:
        """The pruning fraction or threshold in force at ``step`` (cosine decay to ``floor``)."""
        cfg = self.config
        start = cfg.fraction if cfg.prune == "fraction" else cfg.threshold
        progress = min(step / max(self.end_step, 1), 1.0)
        return cfg.floor + (start - cfg.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self) -> int | None:
        """Count one optimizer step; rewire when one is due. Returns the connections changed, or None."""
        self.steps += 1
        if self.steps % self.config.interval or self.steps > self.end_step:
            return None
        return self.rewire(self.steps)

    @torch.no_grad()
    def rewire(self, step: int) -> int:
        """Prune and regrow every row once, keyed by ``step``; returns how many slots were regrown."""
        layer = self.layer
        knob = self.knob(step)
        state = self._slot_states()
        changed = 0
        for start in range(0, layer.out_features, _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, layer.out_features)
            magnitude = layer.weight[start:stop].detach().abs().float()
            prune = self._prune_mask(magnitude, knob)
            if not bool(prune.any()):
                continue
            rows = torch.arange(start, stop, device=prune.device) + layer.row_offset
            old = layer.indices[start:stop]
            # Avoiding all old ids (kept ones are blocked anyway) keeps regrowth off the ids just pruned.
            ids = fill_distinct(old, prune, rows, layer.in_features, (self.seed, REGROW_IDS, step), avoid=old)
            layer.indices[start:stop] = ids.to(layer.indices.dtype)
            layer.weight[start:stop].masked_fill_(prune, 0)
            for tensor in state:
                tensor[start:stop].masked_fill_(prune, 0)
            changed += int(prune.sum())
        self.rewirings += 1
        return changed

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

    def _slot_states(self) -> list[torch.Tensor]:
        """The optimizer's per-slot state tensors of ``layer.weight`` (same shape as the weight)."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(self.layer.weight, {})
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == self.layer.weight.shape]

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
        self.config = SETConfig(**state["config"])
