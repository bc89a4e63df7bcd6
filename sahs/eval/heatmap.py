"""Heatmaps built as matplotlib figures on the Agg canvas (no pyplot, no display needed) and saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def heatmap_figure(
    values: torch.Tensor,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    marks: Sequence[tuple[int, int]] = (),
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    annotate: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """``values`` [rows, cols] as a figure: one tick per row and column (labelled by the given labels, else
    the index), ``marks`` (row, col) cells boxed, values printed with ``annotate``. The colour scale spans
    the values unless ``vmin``/``vmax`` fix it."""
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    rows, cols = values.shape
    figure = Figure(figsize=(max(4.0, 0.22 * cols + 2.5), max(3.0, 0.18 * rows + 1.8)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values.numpy(), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, label=colorbar_label)
    for row, col in marks:
        axes.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    if annotate:
        middle = float(values.mean())
        for row in range(rows):
            for col in range(cols):
                value = float(values[row, col])
                color = "black" if value > middle else "white"
                axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    if xticklabels is None:
        axes.set_xticks(range(cols), [str(col) for col in range(cols)])
    else:
        axes.set_xticks(range(cols), list(xticklabels), rotation=45, ha="right")
    axes.set_yticks(range(rows), [str(row) for row in range(rows)] if yticklabels is None else list(yticklabels))
    axes.tick_params(labelsize=8 if max(rows, cols) > 16 else 10)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_heatmap(values: torch.Tensor, path: str | Path, **kwargs: object) -> Path:
    """Write ``heatmap_figure(values, **kwargs)`` as a PNG."""
    return save_figure(heatmap_figure(values, **kwargs), path)
