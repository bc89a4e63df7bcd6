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

    def save(self, sweep_dir: str | Path) -> None:
        write_atomic(Path(sweep_dir) / RECORDS / f"{self.name}.json", json.dumps(asdict(self), indent=1, default=str))


def read_records(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run record of a sweep, in the order the runs started."""
    folder = Path(sweep_dir) / RECORDS
    records = [RunRecord(**json.loads(path.read_text())) for path in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(records, key=lambda record: (record.started, record.number))
