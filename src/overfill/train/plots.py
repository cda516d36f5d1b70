"""`overfill train`'s loss.png: training loss by step (and a running mean) with validation loss on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def plot_losses(metrics: list[dict], path: Path, title: str) -> Path:
    """Training loss per step (and a running mean) with validation loss on top; PNG via the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    train_ce = [(r["step"], r["loss_ce"]) for r in metrics if "loss_ce" in r]  # --loss kd, ce+kd: CE beside the optimised loss
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train (mean of {window})")
    if train_ce:
        ax.plot(*zip(*train_ce), color="tab:green", alpha=0.6, linewidth=0.8, label="train CE (per step)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reply loss, nats (validation: tokens 2..N)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
