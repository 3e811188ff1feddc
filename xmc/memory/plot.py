"""The chart of ``xmc memory --plot``: training memory per GPU, per plan and backend."""

from __future__ import annotations

import os

from xmc.memory.planner import CARDS_GIB, CUDA_RESERVE


def plot(reports: list[dict], path: str | os.PathLike) -> None:
    """A PNG bar chart: one group of bars per plan, one bar per backend, stacked by component group
    (encoder, encoder activations, intermediate / meta head, classifier), with the card sizes as lines."""
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    groups = [
        ("encoder state", lambda c: c.startswith("encoder") and c != "encoder activations", "#4c72b0"),
        ("encoder activations", lambda c: c == "encoder activations", "#8fb0d8"),
        ("intermediate / meta head", lambda c: c.startswith("head"), "#55a868"),
        ("classifier", lambda c: c.startswith("classifier"), "#c44e52"),
    ]
    names = list(dict.fromkeys(n for r in reports for n in r["backends"]))
    bar = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(reports), 4.8))
    hatches = ["", "//", "..", "xx"]
    for j, name in enumerate(names):
        for i, r in enumerate(reports):
            if name not in r["backends"]:
                continue
            comp = r["backends"][name]["components"]
            bottom = 0.0
            x = i - 0.4 + bar * (j + 0.5)
            for label, pick, color in groups:
                value = sum(v for c, v in comp.items() if pick(c)) / 2**30
                ax.bar(
                    x,
                    value,
                    bar * 0.92,
                    bottom=bottom,
                    color=color,
                    hatch=hatches[j % len(hatches)],
                    edgecolor="white",
                    label=label if (i == 0 and j == 0) else None,
                )
                bottom += value
            ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=7)
    top = max(b["total"] for r in reports for b in r["backends"].values()) / 2**30
    for card in CARDS_GIB:
        if card <= top * 1.15:
            ax.axhline(card - CUDA_RESERVE / 2**30, color="grey", lw=0.6, ls="--")
            ax.text(len(reports) - 0.45, card - CUDA_RESERVE / 2**30, f"{card} GB", fontsize=7, va="bottom")
    ax.set_xticks(range(len(reports)))
    ax.set_xticklabels(
        [f"{r['plan']['name'] or 'plan'}\nL={r['plan']['labels']:,}" for r in reports], fontsize=8
    )
    ax.set_ylim(0, top * 1.35)  # room for the legends above the tallest bar
    ax.set_ylabel("GiB per GPU (estimate)")
    legend = ax.legend(loc="upper left", fontsize=8)
    ax.add_artist(legend)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(facecolor="white", edgecolor="black", hatch=hatches[j % len(hatches)])
            for j in range(len(names))
        ],
        labels=names,
        loc="upper center",
        fontsize=8,
        title="bars, left to right",
        title_fontsize=8,
    )
    ax.set_title("Training memory per GPU; dashed: card size less the CUDA reserve", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
