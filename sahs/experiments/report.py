"""The summary of a sweep, rebuilt from its runs' records and folders.

- ``summary.csv`` and ``summary.md``: one row per run with its parameters, detector, head count, the
  sweep's metric, ``loao/auroc_mean`` with its interval, ``loao/auroc_min``, the folds that hit max_iter
  (``not_converged``), each family's AUROC, its folder and, for a failed run, its error; then the paired
  difference of its ``loao/auroc_mean`` to the best run's on the same test rows, with its interval
  (``diff_to_best``, ``diff_ci_low``, ``diff_ci_high``) and ``vs_best``: whether it is distinguishable;
- the plots of ``sahs.experiments.sweep_plots``;
- on W&B, the same table as a ``wandb.Table`` and the plots (``log_summary``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sahs.eval.intervals import Resample, draw_requests, percentile_interval, plain_auroc, replicates
from sahs.experiments.records import CONFIG_FILE, DEFINITION, METRICS_FILE, read_records, write_atomic
from sahs.experiments.sweep_plots import PLOT, PLOTS, plot_sweep

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
MEAN, MIN = "loao/auroc_mean", "loao/auroc_min"
INTERVAL = [f"{MEAN}_ci_low", f"{MEAN}_ci_high", f"{MEAN}_std"]
DIFF = ["diff_to_best", "diff_ci_low", "diff_ci_high", "vs_best"]
N_BOOT, LEVEL, SEED = 1000, 0.95, 0  # the paired comparisons' bootstrap


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
        for name in dict.fromkeys([metric, MEAN, *INTERVAL, MIN]):
            if name in metrics or not name.endswith("_std"):
                row[name] = metrics.get(name)
        row["not_converged"] = metrics.get("loao/folds_not_converged")
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


@dataclass(frozen=True)
class _Replicates:
    """A run's ``loao/auroc_mean`` from its ``scores.csv`` and its replicates under its layout's resample."""

    layout: str
    value: float
    draws: np.ndarray  # [n_boot]


# Summaries are rewritten after every run: a run's replicates are kept while its scores.csv is unchanged,
# and one resample per layout (runs that can be paired share it), so each summary computes the new runs only.
_RUNS: dict[tuple[str, int, int], tuple[tuple[int, int], _Replicates]] = {}
_RESAMPLES: dict[tuple[str, int, int], Resample] = {}


def _replicates(path: Path, n_boot: int, seed: int) -> _Replicates:
    from sahs.experiments.loao import load_scores  # torch: only when there are scores to read

    stat, key = path.stat(), (str(path.resolve()), n_boot, seed)
    if key in _RUNS and _RUNS[key][0] == (stat.st_mtime_ns, stat.st_size):
        return _RUNS[key][1]
    scored = load_scores(path)
    layout = scored.layout()
    if (layout, n_boot, seed) not in _RESAMPLES:
        if len(_RESAMPLES) >= 4:  # a few layouts at most in one sweep: keep memory bounded
            _RESAMPLES.clear()
        _RESAMPLES[layout, n_boot, seed] = draw_requests(scored.parts, n_boot, seed)
    draws = replicates(scored.parts, _RESAMPLES[layout, n_boot, seed]).mean(axis=1)
    entry = _Replicates(layout, float(np.mean([plain_auroc(part) for part in scored.parts])), draws)
    _RUNS[key] = ((stat.st_mtime_ns, stat.st_size), entry)
    return entry


def compare_to_best(rows: list[dict[str, Any]], best: dict[str, Any] | None, n_boot: int = N_BOOT,
                    level: float = LEVEL, seed: int = SEED) -> None:
    """Add to each finished row its paired difference in ``loao/auroc_mean`` to ``best`` (``DIFF`` columns).

    Both runs' ``scores.csv`` must hold the same test rows fold by fold (same data, split seed and
    repeats): requests are resampled once, within each of the best run's folds and classes, and each
    replicate weighs a request alike in both runs (``sahs.eval.intervals.paired_difference``).
    ``vs_best`` is ``best``, ``not distinguishable`` (the interval holds 0), ``lower`` / ``higher``, or
    why no comparison was made.
    """
    if best is None:
        return
    from sahs.experiments.loao import SCORES_FILE

    found: dict[str, _Replicates | str] = {}
    for row in rows:
        if row["status"] == "finished":
            path = Path(row["dir"] or "") / SCORES_FILE
            try:
                found[row["run"]] = _replicates(path, n_boot, seed) if path.is_file() else "no scores.csv"
            except ValueError as error:
                found[row["run"]] = str(error)
    reference = found.get(best["run"])
    for row in rows:
        if row["status"] != "finished":
            continue
        row.update(dict.fromkeys(DIFF))
        mine = found.get(row["run"])
        if row["run"] == best["run"]:
            row.update(diff_to_best=0.0, vs_best="best")
        elif isinstance(mine, _Replicates) and isinstance(reference, _Replicates) and mine.layout == reference.layout:
            estimate = percentile_interval(mine.value - reference.value, mine.draws - reference.draws, level)
            row.update(zip(DIFF[:3], (estimate.value, estimate.low, estimate.high)))
            row["vs_best"] = ("not distinguishable" if estimate.contains(0.0)
                              else "lower" if estimate.high < 0 else "higher")
        else:
            reason = mine if isinstance(mine, str) else reference if isinstance(reference, str) else "other test rows"
            row["vs_best"] = f"not compared: {reason}"


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
        low, high = best.get(f"{MEAN}_ci_low"), best.get(f"{MEAN}_ci_high")
        interval = "" if low is None else f" [{low:.4f}, {high:.4f}]"
        figure = f"{metric} = {best[metric]:.4f}"
        if metric == MEAN:
            figure += interval
        elif best.get(MEAN) is not None:  # a LOAO run chosen on another metric: its mean too
            figure += f" ({MEAN} {best[MEAN]:.4f}{interval})"
        lines.append(f"Best: `{best['run']}` with {figure} ({best['dir']}).")
        tied = [row["run"] for row in rows if row.get("vs_best") == "not distinguishable"]
        compared = [row for row in rows if row.get("diff_ci_low") is not None]
        if compared:
            lines += ["", f"`diff_to_best`: {MEAN} minus the best run's, on the same test rows, with its "
                      f"{LEVEL:.0%} interval (paired bootstrap over requests, B = {N_BOOT}). "
                      + (f"Not distinguishable from the best: {', '.join(f'`{name}`' for name in tied)}."
                         if tied else f"Every compared run ({len(compared)}) is distinguishable from the best.")]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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
    best = best_row(rows, spec.metric, spec.goal)
    compare_to_best(rows, best)
    columns = _columns(rows) if rows else ["run", "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / SUMMARY_CSV, buffer.getvalue())
    write_atomic(sweep_dir / SUMMARY_MD, _markdown(rows, columns, spec.name, best, spec.metric))
    written = [sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD]
    if plot:
        written += plot_sweep(rows, sweep_dir, spec.name, [p.name for p in spec.parameters], spec.method)
    return written


def log_summary(sweep_dir: str | Path, spec, *, offline: bool) -> None:
    """The summary as a W&B run of its own (job type ``summary``, in the sweep's group): table and plot."""
    import wandb

    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir, spec.metric)
    if not rows:
        return
    compare_to_best(rows, best_row(rows, spec.metric, spec.goal))
    columns = _columns(rows)
    run = wandb.init(project=spec.project, entity=spec.entity, group=spec.name, job_type="summary",
                     name=f"{spec.name}-summary", dir=str(sweep_dir), mode="offline" if offline else None,
                     config={"sweep": spec.raw})
    try:
        table = wandb.Table(columns=columns, data=[[_text(row.get(name)) for name in columns] for row in rows])
        logged: dict[str, Any] = {"sweep/summary": table}
        for name in PLOTS:
            if (sweep_dir / name).is_file():
                logged[f"sweep/{Path(name).stem}"] = wandb.Image(str(sweep_dir / name))
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
