"""The plots of a sweep's summary, from its rows (``report.summary_rows``).

- ``auroc_vs_heads.png``: ``loao/auroc_mean`` against head count with its interval. A grid draws one
  line per detector configuration (interval as a band, ``loao/auroc_min`` dashed); a random or Bayesian
  sweep draws each run as a point with its interval as an error bar.
- Random and Bayesian sweeps also get what W&B users read: ``auroc_vs_params.png``, the metric against
  each swept parameter, and ``parallel_coordinates.png``, each run a line across the parameters to its
  metric, coloured by the metric.

A detector class has one colour in every sweep (``detector_color``); legends round numbers to 3 digits.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT = "auroc_vs_heads.png"
PARAMS_PLOT = "auroc_vs_params.png"
PARALLEL_PLOT = "parallel_coordinates.png"
PLOTS = [PLOT, PARAMS_PLOT, PARALLEL_PLOT]
MEAN, MIN = "loao/auroc_mean", "loao/auroc_min"
LOW, HIGH = f"{MEAN}_ci_low", f"{MEAN}_ci_high"
COLORS = {"LogisticDetector": "C0", "SparseL1Detector": "C1", "group lasso": "C2", "MLPDetector": "C3"}
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def detector_class(label: str | None) -> str:
    """``MLPDetector(hidden=[64])`` -> ``MLPDetector``; a group-lasso ``SparseL1Detector`` is ``group lasso``."""
    label = label or "LogisticDetector()"
    name = label.partition("(")[0]
    return "group lasso" if name == "SparseL1Detector" and "group_lasso=True" in label else name


def detector_color(label: str | None) -> str:
    """The colour of a detector's class, the same in every sweep (other classes: by a hash of the name)."""
    name = detector_class(label)
    return COLORS.get(name, f"C{4 + zlib.crc32(name.encode()) % 6}")


def rounded(text: Any) -> str:
    """A label with every long number cut to 3 significant digits (``l2=0.0001234567890123`` -> ``l2=0.000123``)."""
    return re.sub(r"-?\d+\.\d+(?:e[-+]?\d+)?|-?\d+e[-+]?\d+",
                  lambda match: f"{float(match.group()):.3g}", str(text))


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] == "finished" and row.get(MEAN) is not None]


def _errors(rows: list[dict[str, Any]]) -> np.ndarray | None:
    """``[2, n]`` distances from each mean to its interval's ends (None without intervals)."""
    if any(row.get(LOW) is None or row.get(HIGH) is None for row in rows):
        return None
    return np.array([[row[MEAN] - row[LOW] for row in rows], [row[HIGH] - row[MEAN] for row in rows]]).clip(0)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Write through a partial file, so a reader never sees half a plot."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.png")  # workers may write at once
    figure.savefig(partial, dpi=120)
    partial.replace(path)
    return path


def plot_auroc_vs_heads(rows: list[dict[str, Any]], title: str, grid: bool = True) -> Figure | None:
    """LOAO AUROC against head count: lines with interval bands (grid) or points with error bars."""
    done = [row for row in _finished(rows) if row.get("heads") is not None]
    if not done:
        return None
    figure = _figure(7.5, 4.8)
    axes = figure.add_subplot()
    if grid:
        _lines(axes, done)
    else:
        for name in sorted({detector_class(row.get("detector")) for row in done}):
            mine = [row for row in done if detector_class(row.get("detector")) == name]
            axes.errorbar([row["heads"] for row in mine], [row[MEAN] for row in mine], yerr=_errors(mine), fmt="o",
                          color=detector_color(mine[0].get("detector")), alpha=0.8, capsize=2, label=name)
    axes.set_xscale("log", base=2)
    ticks = sorted({row["heads"] for row in done})
    axes.set_xticks(ticks, [f"{h:g}" for h in ticks])
    axes.minorticks_off()
    axes.set(title=f"{title}: leave-one-attack-out AUROC", xlabel="heads fed to the detector", ylabel="AUROC")
    axes.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside lower center", ncols=2)
    return figure


def _lines(axes, done: list[dict[str, Any]]) -> None:
    """One line per detector configuration; runs at one head count (other parameters varied) averaged."""
    points: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in done:
        points[row.get("detector") or "LogisticDetector()"][row["heads"]].append(row)
    seen: dict[str, int] = defaultdict(int)
    for label in sorted(points, key=lambda text: (detector_class(text), text)):
        heads = sorted(points[label])
        mean = lambda name: [float(np.mean([row[name] for row in points[label][h]])) for h in heads]  # noqa: E731
        index = seen[detector_class(label)]
        seen[detector_class(label)] += 1
        color, style, marker = detector_color(label), STYLES[index % 4], MARKERS[index % 6]
        axes.plot(heads, mean(MEAN), linestyle=style, marker=marker, color=color, label=f"{rounded(label)} mean")
        if all(row.get(LOW) is not None for h in heads for row in points[label][h]):
            axes.fill_between(heads, mean(LOW), mean(HIGH), color=color, alpha=0.12, linewidth=0)
        if all(row.get(MIN) is not None for h in heads for row in points[label][h]):
            axes.plot(heads, mean(MIN), linestyle=style, marker="", color=color, alpha=0.5, linewidth=0.8,
                      label=f"{rounded(label)} min")


def _axis(values: list[Any]) -> tuple[np.ndarray, list[float], list[str], bool, bool]:
    """Positions of a parameter's values: numbers as they are (``log`` when positive and spread over 20x),
    anything else as evenly spaced categories. Returns positions, tick positions, tick labels, log, numeric."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        x = np.array(values, dtype=float)
        log = bool((x > 0).all() and x.max() / x.min() >= 20)
        return x, [], [], log, True
    names = sorted({_category(v) for v in values})
    return np.array([names.index(_category(v)) for v in values], dtype=float), list(range(len(names))), names, False, False


def _category(value: Any) -> str:
    """A short name for a categorical value: a config file's stem, or the rounded text (30 characters)."""
    text = value if isinstance(value, str) else json.dumps(value)
    if text.endswith((".yaml", ".yml")):
        return Path(text).stem
    text = rounded(text)
    return text if len(text) <= 30 else text[:29] + "…"


def plot_params(rows: list[dict[str, Any]], title: str, params: list[str]) -> Figure | None:
    """The metric against each swept parameter (and head count), one panel each, coloured by detector class."""
    done = _finished(rows)
    names = ["heads", *[p for p in params if p != "loao.top_k"]]
    names = [name for name in names if all(row.get(name) is not None for row in done)]
    if not done or not names:
        return None
    columns = min(3, len(names))
    figure = _figure(4.2 * columns, 3.4 * math.ceil(len(names) / columns) + 0.4)
    classes = sorted({detector_class(row.get("detector")) for row in done})
    for index, name in enumerate(names):
        axes = figure.add_subplot(math.ceil(len(names) / columns), columns, index + 1)
        x, ticks, labels, log, numeric = _axis([row[name] for row in done])
        for cls in classes:
            pick = [i for i, row in enumerate(done) if detector_class(row.get("detector")) == cls]
            mine = [done[i] for i in pick]
            jitter = 0 if numeric else 0.08 * (classes.index(cls) - (len(classes) - 1) / 2)
            axes.errorbar(x[pick] + jitter, [row[MEAN] for row in mine], yerr=_errors(mine), fmt="o", ms=4,
                          color=detector_color(mine[0].get("detector")), alpha=0.75, capsize=2,
                          label=cls if index == 0 else None)
        if log:
            axes.set_xscale("log")
        if not numeric:
            axes.set_xticks(ticks, labels, rotation=20, ha="right", fontsize=7)
        axes.set(xlabel=name, ylabel=MEAN if index % columns == 0 else None)
        axes.grid(alpha=0.3)
    figure.suptitle(f"{title}: {MEAN} (with its interval) against each swept parameter")
    figure.legend(fontsize=8, loc="outside lower center", ncols=max(1, len(classes)))
    return figure


def plot_parallel(rows: list[dict[str, Any]], title: str, params: list[str]) -> Figure | None:
    """Parallel coordinates: one line per run through its parameters to its metric, coloured by the metric."""
    done = _finished(rows)
    names = [p for p in params if all(row.get(p) is not None for row in done)]
    if "heads" not in names and all(row.get("heads") is not None for row in done):
        names.insert(0, "heads")
    if len(done) < 2 or not names:
        return None
    names.append(MEAN)
    figure = _figure(max(6.0, 1.8 * len(names)), 4.8)
    axes = figure.add_subplot()
    scaled = np.empty((len(done), len(names)))
    for j, name in enumerate(names):
        x, ticks, labels, log, numeric = _axis([row[name] for row in done])
        if log:
            x = np.log10(x)
        low, high = (x.min(), x.max()) if numeric else (0.0, max(1.0, len(labels) - 1.0))
        span = high - low or 1.0
        scaled[:, j] = (x - low) / span if high > low else 0.5  # a constant sits mid-axis
        if numeric and high == low:
            marks = [(0.5, rounded(f"{10**low if log else low:.4g}"))]
        elif numeric:
            ends = [10**low, 10**high] if log else [low, high]
            marks = [(0.0, rounded(f"{ends[0]:.4g}")), (1.0, rounded(f"{ends[1]:.4g}"))]
        else:
            marks = [((t - low) / span, label) for t, label in zip(ticks, labels)]
        for y, text in marks:
            axes.annotate(text, (j, y), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    metric = np.array([row[MEAN] for row in done])
    colormap = figure.colorbar(_mappable(metric), ax=axes, label=MEAN)
    for i in np.argsort(metric):  # best on top
        axes.plot(range(len(names)), scaled[i], color=colormap.mappable.to_rgba(metric[i]), alpha=0.8, linewidth=1.2)
    for j in range(len(names)):
        axes.axvline(j, color="black", linewidth=0.8)
    axes.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    axes.set_yticks([])
    axes.set_xlim(-0.2, len(names) - 0.6)
    axes.set_title(f"{title}: parallel coordinates ({len(done)} runs)")
    return figure


def _mappable(values: np.ndarray):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(Normalize(values.min(), values.max() if values.max() > values.min() else values.min() + 1e-9),
                          cmap="viridis")


def plot_sweep(rows: list[dict[str, Any]], sweep_dir: Path, title: str, params: list[str], method: str) -> list[Path]:
    """Every plot of the sweep that its finished runs allow; returns the files written."""
    grid = method == "grid"
    figures = {PLOT: plot_auroc_vs_heads(rows, title, grid=grid)}
    if not grid:
        figures.update({PARAMS_PLOT: plot_params(rows, title, params), PARALLEL_PLOT: plot_parallel(rows, title, params)})
    return [_save(figure, Path(sweep_dir) / name) for name, figure in figures.items() if figure is not None]
