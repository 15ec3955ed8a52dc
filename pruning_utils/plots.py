"""Figures shared by the chapters. Each returns a matplotlib Figure (not shown by pyplot) to glue."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def training_curves(histories: dict[str, dict], window: int = 20) -> Figure:
    """Training loss (smoothed) and test accuracy against epochs, one line per model."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, h in histories.items():
        per_epoch = len(h["step"]) / len(h["epoch"])
        ax_loss.plot(np.asarray(h["step"]) / per_epoch, smooth(h["loss"], window), label=label)
        acc = np.asarray(h["test_acc"], dtype=float)
        ok = ~np.isnan(acc)
        ax_acc.plot(np.asarray(h["epoch"])[ok], acc[ok], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy, nats)", yscale="log",
                title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (fraction correct)", title="test accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return fig
