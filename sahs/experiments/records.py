"""What a sweep keeps on disk: one record per run, and the files a run folder holds for the summary."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORDS = "runs"  # <sweep dir>/runs/<run name>.json
DEFINITION = "sweep.yaml"  # <sweep dir>/sweep.yaml: the sweep definition it was started with
CONFIG_FILE = "config.yaml"  # <run folder>/config.yaml: the run's full resolved config
METRICS_FILE = "metrics.json"  # <run folder>/metrics.json: the metrics the run logged
RUN_LOG = "sweep_run.log"  # <run folder>/sweep_run.log: what the run printed while a sweep ran it
SWEEP_FILE = "sweep.json"  # <sweep dir>/sweep.json: the sweep's name and (password removed) its storage


def write_atomic(path: Path, text: str) -> None:
    """Write, then rename: a reader (or Ctrl-C) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


@dataclass
class RunRecord:
    """One run of a sweep: its parameters, how it ended and where its files are."""

    name: str
    number: int
    params: dict[str, Any]
    status: str = "running"  # running | finished | failed | interrupted
    dir: str | None = None
    error: str | None = None
    value: float | None = None  # the sweep's metric
    metrics: dict[str, float] = field(default_factory=dict)  # everything the run logged
    detector: str | None = None  # e.g. MLPDetector(hidden=[64, 64])
    started: float = field(default_factory=time.time)
    finished: float | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    warnings: dict[str, int] = field(default_factory=dict)  # each distinct warning the run raised: how often
    cpu: float | None = None  # CPU seconds its process spent on the run

    def save(self, sweep_dir: str | Path) -> None:
        write_atomic(Path(sweep_dir) / RECORDS / f"{self.name}.json", json.dumps(asdict(self), indent=1, default=str))


def read_records(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run record of a sweep, in the order the runs started."""
    folder = Path(sweep_dir) / RECORDS
    records = [_record(json.loads(path.read_text())) for path in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(records, key=lambda record: (record.started, record.number))


def _record(fields: dict[str, Any]) -> RunRecord:
    known = RunRecord.__dataclass_fields__
    return RunRecord(**{key: value for key, value in fields.items() if key in known})


def records_from_trials(trials) -> list[RunRecord]:
    """Every run's record as kept in an Optuna study (user attrs ``run`` and ``record``), one per run name.

    A point tried more than once (its worker lost, then run again) is its latest attempt: the one still
    running, else the last with a record. Attempts without a record (a killed worker's) are not runs.
    """
    latest: dict[str, RunRecord] = {}
    for trial in sorted(trials, key=lambda trial: trial.number):
        name, text = trial.user_attrs.get("run"), (trial.user_attrs.get("outcome") or {}).get("record")
        if name is None or trial.user_attrs.get("skipped"):
            continue
        if trial.state.name == "RUNNING":
            params = {key: value for key, value in trial.params.items()}
            worker = trial.user_attrs.get("worker") or {}
            latest[name] = RunRecord(name, trial.user_attrs.get("point", trial.number), params,
                                     host=worker.get("host", ""), pid=worker.get("pid", 0))
        elif text is not None and trial.state.name != "WAITING":
            latest[name] = _record(json.loads(text))
    return sorted(latest.values(), key=lambda record: (record.started, record.number))
