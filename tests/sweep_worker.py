"""One sweep worker for the tests: the real sweep loop, storage and heartbeat, with runs that take a moment.

    python tests/sweep_worker.py SWEEP.yaml SWEEP_DIR STORAGE CALLS_DIR WORKERS [KILL_RUN]

Each worker plays a machine of its own (its host name is its worker index), so a lost worker is found
only by its heartbeat. Every call of a run leaves a file in CALLS_DIR (run name, process, start time);
the worker that first runs KILL_RUN SIGKILLs itself in the middle of it. Workers wait for each other
before the first run, so that all of them share the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUN_SECONDS = 0.3
HEARTBEAT = 1


def main(spec_path: str, sweep_dir: str, storage: str, calls: str, workers: str, kill: str = "") -> None:
    worker = os.environ["SAHS_SWEEP_WORKER"].partition("/")[0]
    socket.gethostname = lambda: f"node-{worker}"  # noqa: E731 - as if each worker ran on its own machine
    from sahs.experiments.sweep import RunOutcome, run_local
    from sahs.experiments.sweep_spec import load_sweep

    calls_dir = Path(calls)
    (calls_dir / f"ready-{worker}").touch()
    deadline = time.monotonic() + 120
    while len(list(calls_dir.glob("ready-*"))) < int(workers) and time.monotonic() < deadline:
        time.sleep(0.05)

    def execute(params: dict, name: str) -> RunOutcome:
        first = not list(calls_dir.glob(f"{name}.*"))
        (calls_dir / f"{name}.{os.getpid()}").write_text(json.dumps({"start": time.time(), "params": params}))
        if name == kill and first:
            time.sleep(RUN_SECONDS)  # mid-run: the heartbeat has beaten at least once
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(RUN_SECONDS)
        run_dir = Path(sweep_dir) / "loao" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        value = 0.5 + 0.01 * params["loao.top_k"]
        metrics = {"loao/auroc_mean": value, "loao/auroc_min": value - 0.1, "loao/num_heads_mean": params["loao.top_k"]}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return RunOutcome(run_dir, metrics, str(params["model.detector"]))

    run_local(load_sweep(spec_path), Path(sweep_dir), execute, storage=storage, heartbeat=HEARTBEAT,
              say=lambda line: print(f"[{worker}] {line}", flush=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
