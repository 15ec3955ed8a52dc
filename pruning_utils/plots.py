"""Figures shared by the chapters. Each returns a matplotlib Figure, made without pyplot, for myst-nb's
``glue`` (a notebook runs ``%matplotlib inline`` once, so that IPython can render a Figure as PNG)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


DPI = 110


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches with constrained layout."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def training_curves(histories: dict[str, dict], window: int = 20) -> Figure:
    """Training loss (smoothed) and test accuracy against epochs, one line per model."""
    fig = new_figure(10, 3.6)
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


def panel_grid(n_panels: int, ncols: int | None = None, panel_size: tuple[float, float] = (3.6, 3.0),
               sharey: bool = False, sharex: bool = False) -> tuple[Figure, list]:
    """A figure with one axes per panel in rows of ``ncols`` (spare axes hidden); returns (fig, axes)."""
    ncols = ncols or n_panels
    nrows = -(-n_panels // ncols)
    fig = new_figure(panel_size[0] * ncols, panel_size[1] * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def label_grid(axes: list, xlabel: str, ylabel: str, ncols: int | None = None, legend: bool = True,
               grid: bool = True) -> None:
    """x labels on every panel, y labels on the first panel of each row, a legend on the first panel."""
    for i, ax in enumerate(axes):
        ax.set_xlabel(xlabel)
        if grid:
            ax.grid(alpha=0.3)
        if i % (ncols or len(axes)) == 0:
            ax.set_ylabel(ylabel)
    if legend:
        axes[0].legend(fontsize="small")


def curves_grid(panels: dict[str, dict[str, tuple]], xlabel: str, ylabel: str, ncols: int | None = None,
                panel_size: tuple[float, float] = (3.6, 3.0)) -> Figure:
    """One panel per entry; each panel draws lines ``label -> (x, y)`` or ``(x, y, matplotlib kwargs)``."""
    fig, axes = panel_grid(len(panels), ncols, panel_size, sharey=True)
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, line in lines.items():
            x, y, *style = line
            ax.plot(x, y, label=label, **(style[0] if style else {"marker": "o"}))
        ax.set_title(title)
    label_grid(axes, xlabel, ylabel, ncols)
    return fig


def bars_grid(panels: dict[str, np.ndarray], xlabel: str, ylabel: str, ncols: int | None = None,
              ticklabels: list[str] | None = None, panel_size: tuple[float, float] = (3.6, 2.8),
              sharey: bool = False) -> Figure:
    """One bar chart per entry, bars in the given order."""
    fig, axes = panel_grid(len(panels), ncols, panel_size, sharey=sharey)
    for ax, (title, values) in zip(axes, panels.items()):
        pos = np.arange(len(values))
        ax.bar(pos, values)
        if ticklabels is not None:
            ax.set_xticks(pos, ticklabels, fontsize="x-small")
        ax.set_title(title)
    label_grid(axes, xlabel, ylabel, ncols, legend=False, grid=False)
    return fig


def feature_maps(maps: dict[str, np.ndarray], max_maps: int = 16) -> Figure:
    """Activation maps of one image, a row per layer; 1x1 maps are shown together as one tile."""
    rows = list(maps.items())
    ncols = max(min(m.shape[0], max_maps) if m.shape[-1] > 1 else 1 for _, m in rows)
    fig = new_figure(1.2 * ncols, 1.4 * len(rows))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (name, m) in enumerate(rows):
        if m.shape[-1] == 1:  # e.g. 120 maps of 1x1: one tile, a pixel per map
            flat = m.reshape(-1)
            side = int(np.ceil(np.sqrt(len(flat))))
            tiles = [np.pad(flat, (0, side * side - len(flat))).reshape(side, side)]
        else:
            tiles = list(m[:max_maps])
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(tiles):
                ax.imshow(tiles[c], cmap="viridis")
            else:
                ax.set_visible(False)
        axes[r, 0].set_ylabel(name, fontsize="small")
    return fig
