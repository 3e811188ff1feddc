"""Pictures of runs: P@k by label-frequency decile, and training curves (``xmc evaluate --plot``, and
``plots/`` in a run folder after training).

One PNG, one run or several side by side:

- **P@k by decile**: labels are put in 10 frequency groups by :func:`xmc.metrics.label_buckets` (each
  holds about a tenth of the training label occurrences, most frequent first: decile 1 is the head, 10
  the tail; labels without training rows are in 10), and each bar is the share of P@k whose hits fall
  in that group (:func:`xmc.metrics.precision_by_frequency`): a run's ten bars add up to its P@k.
- **Training curves** (runs whose ``metrics.json`` is known): the mean training loss per epoch, the dev
  P@1 per evaluation, and the SET rewirings done in each epoch where the history records them.

matplotlib is optional (the ``plot`` and ``dev`` extras) and imported only here, when a picture is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

DECILES = 10


class PlotUnavailable(ValueError):
    """matplotlib is not installed; the message says how to install it."""


@dataclass
class RunPicture:
    """What one run contributes: ``name`` (legend), ``deciles`` {k: (10,) fractions} or None, and the
    ``history`` of its ``metrics.json`` (per-epoch dicts) or empty."""

    name: str
    deciles: dict[int, np.ndarray] | None = None
    history: list[dict] = field(default_factory=list)


def decile_precision(Y_true, topk: np.ndarray, Y_train, ks=(1, 3, 5), exclude=None) -> dict[int, np.ndarray]:
    """{k: (10,) float64}: the part of P@k from hits on each label-frequency decile (head first)."""
    from xmc.metrics import precision_by_frequency

    names = [str(d) for d in range(1, DECILES + 1)]
    scores = precision_by_frequency(Y_true, topk, Y_train, ks=ks, buckets=names, exclude=exclude)
    return {k: np.array([scores[f"P@{k}/{name}"] for name in names]) for k in ks}


def _pyplot():
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "plots need matplotlib: pip install matplotlib (or the [plot] extra: pip install -e '.[plot]')"
        ) from None
    return plt


def plot_runs(runs: list[RunPicture], path: str | os.PathLike, k: int = 5) -> None:
    """Write one PNG to ``path``: P@``k`` by decile (runs side by side) when any run has deciles, and the
    training curves when any run has a history. Raises :class:`PlotUnavailable` without matplotlib."""
    plt = _pyplot()
    with_deciles = [r for r in runs if r.deciles is not None]
    with_history = [r for r in runs if any("epoch" in h for h in r.history)]
    panels = (1 if with_deciles else 0) + (2 if with_history else 0)
    if not panels:
        raise ValueError("nothing to plot: no predictions with training labels, and no training history")
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r.name: colors[i % len(colors)] for i, r in enumerate(runs)}
    if with_deciles:
        ax = axes.pop(0)
        width = 0.8 / len(with_deciles)
        x = np.arange(1, DECILES + 1)
        for j, run in enumerate(with_deciles):
            values = 100 * run.deciles[k]
            label = f"{run.name} (P@{k} {values.sum():.1f})"
            ax.bar(x - 0.4 + width * (j + 0.5), values, width * 0.95, color=color[run.name], label=label)
        ax.set_xticks(x)
        ax.set_xlabel("label-frequency decile (1 = head, 10 = tail)")
        ax.set_ylabel(f"share of P@{k} (points)")
        ax.set_title(f"P@{k} by label-frequency decile", fontsize=10)
        ax.legend(fontsize=8)
    if with_history:
        loss_ax, dev_ax = axes
        rewired = None
        for run in with_history:
            epochs = [h for h in run.history if "epoch" in h]
            xs = [h["epoch"] for h in epochs]
            loss_ax.plot(
                xs, [h["train_loss"] for h in epochs], marker="o", color=color[run.name], label=run.name
            )
            dev = [(h["epoch"], 100 * h["dev/P@1"]) for h in epochs if "dev/P@1" in h]
            if dev:
                dev_ax.plot(*zip(*dev, strict=True), marker="o", color=color[run.name], label=run.name)
            counts = [(h["epoch"], h["rewirings"]) for h in epochs if "rewirings" in h]
            if counts and counts[-1][1]:
                rewired = rewired or loss_ax.twinx()
                per_epoch = np.diff([0] + [c for _, c in counts])
                rewired.bar([e for e, _ in counts], per_epoch, 0.3, color=color[run.name], alpha=0.25)
        if rewired is not None:
            rewired.set_ylabel("SET rewirings in the epoch (bars)", fontsize=8)
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("mean training loss")
        loss_ax.set_yscale("log")
        loss_ax.set_title("training loss", fontsize=10)
        loss_ax.legend(fontsize=8)
        dev_ax.set_xlabel("epoch")
        dev_ax.set_ylabel("dev P@1 (%)")
        dev_ax.set_title("dev P@1 (model selection split)", fontsize=10)
        if dev_ax.lines:
            dev_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
