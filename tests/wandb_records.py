"""Read what an offline W&B run recorded, from its ``.wandb`` file (no server, no W&B API).

The file is a LevelDB-style log: 32 KiB blocks of chunks, each with a 7-byte header (CRC, length,
type: full, first, middle, last), after a 7-byte W&B header. Each record is a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    position, pending, out = 7, b"", []
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # the rest of a block too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
    parsed = []
    for payload in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def offline_run(folder: Path) -> dict:
    """Name, group, job type, tags, config and last logged values of the one offline run under ``folder``."""
    files = sorted(Path(folder).rglob("offline-run-*/*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {folder}, found {files}"
    return read_run(files[0])


def offline_runs(folder: Path) -> dict[str, dict]:
    """Every offline run under ``folder``, by name."""
    runs = [read_run(path) for path in sorted(Path(folder).rglob("offline-run-*/*.wandb"))]
    return {run["name"]: run for run in runs}


def read_run(path: Path, wait: float = 20.0) -> dict:
    """The run's records once W&B's writer (a process of its own) has written its exit record."""
    deadline = time.monotonic() + wait
    parsed = records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in parsed) and time.monotonic() < deadline:
        time.sleep(0.2)
        parsed = records(path)
    run, config, summary = None, {}, {}
    for record in parsed:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.history.item})
    assert run is not None, f"{path} holds no run record"
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "tags": list(run.tags),
            "config": config, "logged": summary, "file": path}
