"""The loss-curve PNG written beside the checkpoints."""

from __future__ import annotations

import math
from pathlib import Path


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    train = history.get("train", [])
    if train:
        steps = [s for s, _ in train]
        losses = [v for _, v in train]
        ax.plot(steps, losses, color="#9ab", linewidth=0.6, label="train (per step)")
        smooth, avg = [], losses[0]
        for v in losses:  # exponential moving average, easier to read than the raw curve
            avg = 0.95 * avg + 0.05 * v
            smooth.append(avg)
        ax.plot(steps, smooth, color="#236", linewidth=1.4, label="train (smoothed)")
    val = history.get("val", [])
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="#c42", label="validation")
        best = min(v for _, v in val)
        ax.set_title(f"best validation loss {best:.4f} nats/token ({best / math.log(2):.4f} bits)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
