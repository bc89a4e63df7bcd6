"""The summary of a sweep, rebuilt from its runs' records and folders.

- ``summary.csv`` and ``summary.md``: one row per run with its parameters, detector, head count, the
  sweep's metric, ``loao/auroc_mean``, ``loao/auroc_min``, each family's AUROC, its folder and, for a
  failed run, its error;
- ``auroc_vs_heads.png``: LOAO AUROC against head count, one line per detector (mean solid, min dashed);
- on W&B, the same table as a ``wandb.Table`` and the plot (``log_summary``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sahs.experiments.records import CONFIG_FILE, DEFINITION, METRICS_FILE, read_records, write_atomic

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOT = "auroc_vs_heads.png"
MEAN, MIN = "loao/auroc_mean", "loao/auroc_min"


def detector_label(config: dict[str, Any]) -> str:
    """``MLPDetector(hidden=[64, 64], dropout=0.1, l2=0.001)``: the detector class and its set init args."""
    spec = (config.get("model") or {}).get("detector") or {}
    name = spec.get("class_path", "sahs.models.detectors.LogisticDetector").rpartition(".")[2]
    args = [f"{key}={value}" for key, value in (spec.get("init_args") or {}).items() if value is not None]
    return f"{name}({', '.join(args)})"


def _text(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def summary_rows(sweep_dir: str | Path, metric: str = MEAN, from_folders: bool = False,
                 records: list | None = None) -> list[dict[str, Any]]:
    """One row per run of the sweep, from its record, or (``from_folders``) from the files in its folder.

    ``records``: the runs' records when not read from ``<sweep dir>/runs`` (e.g. from the sweep's storage).
    """
    rows = []
    for record in read_records(sweep_dir) if records is None else records:
        row: dict[str, Any] = {"run": record.name, "status": record.status}
        row.update({name: _text(value) for name, value in record.params.items()})
        folder = Path(record.dir) if record.dir else None
        metrics, row["detector"] = record.metrics, record.detector
        if from_folders and folder is not None and (folder / METRICS_FILE).is_file():
            metrics = json.loads((folder / METRICS_FILE).read_text())
        if from_folders and folder is not None and (folder / CONFIG_FILE).is_file():
            row["detector"] = detector_label(yaml.safe_load((folder / CONFIG_FILE).read_text()))
        heads = metrics.get("loao/num_heads_mean")
        row["heads"] = int(heads) if heads is not None and float(heads).is_integer() else heads
        for name in dict.fromkeys([metric, MEAN, MIN]):
            row[name] = metrics.get(name)
        families = sorted(key for key in metrics if key.count("/") == 2 and key.endswith("/auroc"))
        row.update({key: metrics[key] for key in families})
        row["dir"] = record.dir
        row["error"] = record.error
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tail = [name for name in ("dir", "error") if name in columns]
    return [name for name in columns if name not in tail] + tail


def best_row(rows: list[dict[str, Any]], metric: str, goal: str = "maximize") -> dict[str, Any] | None:
    done = [row for row in rows if row["status"] == "finished" and row.get(metric) is not None]
    if not done:
        return None
    return (max if goal == "maximize" else min)(done, key=lambda row: row[metric])


def _markdown(rows: list[dict[str, Any]], columns: list[str], title: str, best: dict | None, metric: str) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Sweep {title}", ""]
    counts = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".")
    if best is not None:
        lines.append(f"Best: `{best['run']}` with {metric} = {best[metric]:.4f} ({best['dir']}).")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_auroc_vs_heads(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """LOAO AUROC (mean solid, min dashed) against head count, one colour per detector."""
    lines: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["status"] == "finished" and row.get("heads") is not None and row.get(MEAN) is not None:
            lines[row.get("detector", "detector")][row["heads"]].append((row[MEAN], row[MIN]))
    if not lines:
        return None
    figure = Figure(figsize=(7.5, 4.5 + 0.12 * len(lines)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (detector, points) in enumerate(sorted(lines.items())):
        heads = sorted(points)
        # several runs at one head count (other parameters varied): their average
        means = [sum(m for m, _ in points[h]) / len(points[h]) for h in heads]
        mins = [sum(m for _, m in points[h]) / len(points[h]) for h in heads]
        color = f"C{index % 10}"
        axes.plot(heads, means, "o-", color=color, label=f"{detector} mean")
        axes.plot(heads, mins, "v--", color=color, alpha=0.7, label=f"{detector} min")
    axes.set_xscale("log", base=2)
    ticks = sorted({h for points in lines.values() for h in points})
    axes.set_xticks(ticks, [f"{h:g}" for h in ticks])
    axes.minorticks_off()
    axes.set(title=f"{title}: leave-one-attack-out AUROC", xlabel="heads fed to the detector", ylabel="AUROC")
    axes.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside lower center", ncols=2)
    figure.savefig(path, dpi=120)
    return path


def write_summary(sweep_dir: str | Path, spec=None, plot: bool = True, from_folders: bool = False,
                  records: list | None = None) -> list[Path]:
    """Write the summary table (CSV, markdown) and (``plot``) the plot of a sweep folder; returns the files written.

    Without ``spec`` the sweep's definition is read from the folder; ``from_folders`` takes each finished
    run's metrics and detector from its own folder rather than from the sweep's record of it.
    """
    sweep_dir = Path(sweep_dir)
    if spec is None:
        from sahs.experiments.sweep_spec import SweepError, load_sweep

        if not (sweep_dir / DEFINITION).is_file():
            raise SweepError(f"{sweep_dir} is not a sweep folder (no {DEFINITION}); pass the folder that "
                                    "`sahs sweep` printed, e.g. outputs/demo/sweeps/demo_capacity")
        spec = load_sweep(sweep_dir / DEFINITION)
    rows = summary_rows(sweep_dir, spec.metric, from_folders, records)
    columns = _columns(rows) if rows else ["run", "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / SUMMARY_CSV, buffer.getvalue())
    best = best_row(rows, spec.metric, spec.goal)
    write_atomic(sweep_dir / SUMMARY_MD, _markdown(rows, columns, spec.name, best, spec.metric))
    written = [sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD]
    partial = sweep_dir / f".{PLOT}.{os.getpid()}.partial.png"  # workers may write at once
    if plot and plot_auroc_vs_heads(rows, partial, spec.name) is not None:
        partial.replace(sweep_dir / PLOT)
        written.append(sweep_dir / PLOT)
    return written


def log_summary(sweep_dir: str | Path, spec, *, offline: bool) -> None:
    """The summary as a W&B run of its own (job type ``summary``, in the sweep's group): table and plot."""
    import wandb

    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir, spec.metric)
    if not rows:
        return
    columns = _columns(rows)
    run = wandb.init(project=spec.project, entity=spec.entity, group=spec.name, job_type="summary",
                     name=f"{spec.name}-summary", dir=str(sweep_dir), mode="offline" if offline else None,
                     config={"sweep": spec.raw})
    try:
        table = wandb.Table(columns=columns, data=[[_text(row.get(name)) for name in columns] for row in rows])
        logged: dict[str, Any] = {"sweep/summary": table}
        if (sweep_dir / PLOT).is_file():
            logged["sweep/auroc_vs_heads"] = wandb.Image(str(sweep_dir / PLOT))
        done = [row for row in rows if row["status"] == "finished" and row.get("heads") is not None]
        detectors = sorted({row.get("detector", "detector") for row in done})
        if done:
            series = [sorted((row["heads"], row[MEAN]) for row in done if row.get("detector", "detector") == d)
                      for d in detectors]
            logged["sweep/auroc_mean_vs_heads"] = wandb.plot.line_series(
                xs=[[h for h, _ in points] for points in series], ys=[[a for _, a in points] for points in series],
                keys=detectors, title=f"{spec.name}: {MEAN} against head count", xname="heads")
        run.log(logged)
    finally:
        run.finish()
