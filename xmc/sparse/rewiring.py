"""The rewiring schedules of a model's fixed fan-in layers, and what gradient regrowth needs of a batch.

The classifier (when fixed fan-in) and a fixed fan-in intermediate layer each get a
:class:`~xmc.sparse.dst.SET` schedule from ``classifier.set``; only the intermediate layer may ablate neurons
(``set.gamma``).

Gradient regrowth (``set.regrow=gradient``) ranks absent connections by the dense gradient summed over the
last ``set.grad_batches`` batches before a rewiring (one by default). On the micro-batch that ends each of
those optimizer steps' windows, :meth:`Rewiring.capture` keeps:

- the classifier's input ``h`` (B, D) and the batch's positives: the classifier's dense gradient is
  recomputed from them label chunk by label chunk (``Classifier.dense_gradient``), at the weights of
  the step just taken, so the (L, D) gradient never exists in full. An input that is mostly zeros (a
  TF-IDF vector fed as it is) is kept as a sparse tensor and made dense one batch at a time;
- the intermediate layer's input (B, E) and output gradient (B, D'), from which its (D', E) dense
  gradient is one product per batch (the layer is small).

Over fixed inputs (bag of words with ``encoder.dim=0``, frozen encoders) every kept batch's gradient is
exact at the current weights; under a trained encoder the older batches' inputs are those it gave then.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque

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
        self.batches = options.grad_batches
        # The kept batches, oldest first: the optimizer step each belongs to, its tensors and positives.
        self._kept: deque[tuple[int, dict[str, torch.Tensor], Positives]] = deque(maxlen=self.batches)
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
        """Whether one of the next ``grad_batches`` optimizer steps regrows by gradient, so the next window's
        last micro-batch is kept."""
        return any(
            s.needs_gradient and any(s.due(s.steps + ahead) for ahead in range(1, self.batches + 1))
            for s in self.schedules.values()
        )

    @contextlib.contextmanager
    def capture(self, positives: Positives):
        """Keep, for the forward and backward run inside, the tensors gradient regrowth needs."""
        model, seen, handles = self.model, {}, []
        step = self._steps() + 1
        while self._kept and self._kept[-1][0] >= step:  # a window begun before (skipped or interrupted)
            self._kept.pop()
        self._kept.append((step, seen, positives))

        def keep_h(module, args, output):
            seen["h"] = _compact(output.detach())

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
        if not self.wants_batch():
            self._kept.clear()

    def _grad_fn(self, name: str):
        key = "h" if name == "classifier" else "grad_out"
        kept = [(seen, positives) for _, seen, positives in self._kept if key in seen]
        if not kept:
            raise RuntimeError("gradient regrowth is due but no batch was captured (please report this)")
        if name == "classifier":
            classifier = self.model.classifier
            dtype = classifier.label_parameters()[0].dtype  # bf16 under autocast

            def labels(start: int, stop: int) -> torch.Tensor:
                total = None
                for seen, positives in kept:
                    h = seen["h"].to_dense() if seen["h"].layout != torch.strided else seen["h"]
                    part = classifier.dense_gradient(h.to(dtype), positives, self.kind, start, stop)
                    total = part if total is None else total.add_(part)
                return total

            return labels
        layer = self.model.intermediate

        def intermediate(start: int, stop: int) -> torch.Tensor:
            rows = layer.global_rows(start, stop)
            total = None
            for seen, _ in kept:
                part = seen["grad_out"].float()[:, rows].t() @ seen["x"].float()
                total = part if total is None else total.add_(part)
            return total

        return intermediate

    def _steps(self) -> int:
        return max((schedule.steps for schedule in self.schedules.values()), default=0)

    @property
    def rewirings(self) -> int:
        """Rewirings so far, every fixed fan-in layer together."""
        return sum(schedule.rewirings for schedule in self.schedules.values())

    def state_dict(self) -> dict:
        """Each schedule's state by layer name, and under ``kept`` the batches kept for a coming gradient
        rewiring (plain tensors), so a run stopped between them resumes to the same regrowth."""
        state: dict = {name: schedule.state_dict() for name, schedule in self.schedules.items()}
        if self._kept:  # a window cut short (Ctrl-C) may be among them: run again, it replaces its batch
            state["kept"] = [_pack(*kept) for kept in self._kept]
        return state

    def load_state_dict(self, state: dict) -> None:
        if "steps" in state:  # a checkpoint from before the intermediate layer could rewire
            state = {"classifier": state}
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(state[name])
        self._kept.clear()
        device = next(iter(self.model.parameters())).device
        for packed in state.get("kept", []):
            self._kept.append(_unpack(packed, device))


def _compact(h: torch.Tensor) -> torch.Tensor:
    """``h`` as a sparse COO tensor when at most a tenth of it is nonzero (a raw TF-IDF vector), else as it
    is: N kept batches of a 200,000-wide input would otherwise hold N * B * 200,000 floats."""
    if h.dim() != 2:
        return h
    nonzero = int(torch.count_nonzero(h))
    return h.to_sparse() if nonzero * 10 <= h.numel() else h


def _pack(step: int, seen: dict[str, torch.Tensor], positives: Positives) -> dict:
    """A kept batch as plain tensors (a sparse input as its COO parts) for a checkpoint."""
    packed = {
        "step": step,
        "indptr": positives.indptr.cpu(),
        "indices": positives.indices.cpu(),
        "num_labels": positives.num_labels,
    }
    for key, tensor in seen.items():
        if tensor.layout == torch.sparse_coo:
            tensor = tensor.coalesce()
            packed[f"{key}.coo"] = [tensor.indices().cpu(), tensor.values().cpu(), list(tensor.shape)]
        else:
            packed[key] = tensor.cpu()
    return packed


def _unpack(packed: dict, device: torch.device) -> tuple[int, dict[str, torch.Tensor], Positives]:
    seen = {}
    for key, value in packed.items():
        if key.endswith(".coo"):
            indices, values, shape = value
            tensor = torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)
            seen[key[: -len(".coo")]] = tensor.coalesce().to(device)
        elif key not in ("step", "indptr", "indices", "num_labels"):
            seen[key] = value.to(device)
    positives = Positives(packed["indptr"].to(device), packed["indices"].to(device), packed["num_labels"])
    return packed["step"], seen, positives
