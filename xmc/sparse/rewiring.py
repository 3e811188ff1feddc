"""The rewiring schedules of a model's fixed fan-in layers, and what gradient regrowth needs of a batch.

The classifier (when fixed fan-in) and a fixed fan-in intermediate layer each get a
:class:`~xmc.sparse.dst.SET` schedule from ``classifier.set``; only the intermediate layer may ablate neurons
(``set.gamma``).

Gradient regrowth (``set.regrow=gradient``) ranks absent connections by the dense gradient of one batch.
On the micro-batch that ends a window whose optimizer step rewires, :meth:`Rewiring.capture` keeps:

- the classifier's input ``h`` (B, D) and the batch's positives: the classifier's dense gradient is
  recomputed from them label chunk by label chunk (``Classifier.dense_gradient``), at the weights of
  the step just taken, so the (L, D) gradient never exists in full;
- the intermediate layer's input (B, E) and output gradient (B, D'), from which its (D', E) dense
  gradient is one product (the layer is small).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from xmc.config import Config
from xmc.losses import Positives
from xmc.nn import FixedFanInLinear
from xmc.sparse.dst import SET


class Rewiring:
    """SET / RigL / SRigL schedules of ``model``'s fixed fan-in layers; ``step`` after each optimizer step."""

    def __init__(self, config: Config, model, total_steps: int, optimizers: list[torch.optim.Optimizer]):
        options = config.classifier.set
        self.model, self.kind = model, config.train.loss
        self.schedules: dict[str, SET] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._positives: Positives | None = None
        if not config.classifier.set.enabled:
            return
        if isinstance(getattr(model.classifier, "layer", None), FixedFanInLinear):
            labels = dataclasses.replace(options, gamma=0.0)  # output labels are never ablated
            self.schedules["classifier"] = SET(
                model.classifier.layer, total_steps, labels, optimizers, config.seed
            )
        if isinstance(model.intermediate, FixedFanInLinear):
            self.schedules["intermediate"] = SET(
                model.intermediate, total_steps, options, optimizers, config.seed + 1
            )

    def __bool__(self) -> bool:
        return bool(self.schedules)

    def wants_batch(self) -> bool:
        """Whether the next optimizer step regrows by gradient, so its window's last micro-batch is kept."""
        return any(s.needs_gradient and s.due(s.steps + 1) for s in self.schedules.values())

    @contextlib.contextmanager
    def capture(self, positives: Positives):
        """Keep, for the forward and backward run inside, the tensors gradient regrowth needs."""
        model, seen, handles = self.model, {}, []
        self._seen, self._positives = seen, positives

        def keep_h(module, args, output):
            seen["h"] = output.detach()

        def keep_intermediate(module, args, output):
            seen["x"] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: seen.__setitem__("grad_out", grad.detach()))

        source = model.intermediate if model.intermediate is not None else model.encoder
        handles.append(source.register_forward_hook(keep_h))
        if "intermediate" in self.schedules:
            handles.append(model.intermediate.register_forward_hook(keep_intermediate))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def step(self) -> None:
        """Advance every schedule by one optimizer step (rewiring those that are due)."""
        for name, schedule in self.schedules.items():
            grad_fn = (
                self._grad_fn(name) if schedule.needs_gradient and schedule.due(schedule.steps + 1) else None
            )
            schedule.step(grad_fn)
        self._seen, self._positives = {}, None

    def _grad_fn(self, name: str):
        seen = self._seen
        if name == "classifier":
            if "h" not in seen:
                raise RuntimeError("gradient regrowth is due but no batch was captured (please report this)")
            classifier, positives = self.model.classifier, self._positives
            h = seen["h"].to(classifier.label_parameters()[0].dtype)  # bf16 under autocast
            return lambda start, stop: classifier.dense_gradient(h, positives, self.kind, start, stop)
        if "grad_out" not in seen:
            raise RuntimeError("gradient regrowth is due but no batch was captured (please report this)")
        layer = self.model.intermediate
        x, grad_out = seen["x"].float(), seen["grad_out"].float()

        def intermediate(start: int, stop: int) -> torch.Tensor:
            return grad_out[:, layer.global_rows(start, stop)].t() @ x

        return intermediate

    def state_dict(self) -> dict:
        return {name: schedule.state_dict() for name, schedule in self.schedules.items()}

    def load_state_dict(self, state: dict) -> None:
        if "steps" in state:  # a checkpoint from before the intermediate layer could rewire
            state = {"classifier": state}
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(state[name])
