"""Sweep runner: its cost per run, runs/min with 1 and 2 worker processes, and each storage's own cost.

    OMP_NUM_THREADS=1 python bench/bench_sweep.py [--cache outputs/cache/demo] [--skip workers,storages]

On the demo cache (built with `sahs extract --config configs/demo.yaml` when missing):

- **runner cost**: a grid of detector x head count three ways in one process: direct
  `leave_one_attack_out` calls on features read once (before), the same grid through the offline
  sweep's loop (what `sahs sweep` runs: Optuna, one run folder, config, W&B offline run, record), and the
  direct calls again (after); runs per minute and the runner's cost per run, wall and CPU of this process;
- **workers**: `sahs sweep --workers N` (real processes, each reading the cache once) with N = 1 and 2
  on a larger grid; runs/min over the time all workers were running warm (from the records' start and
  end times: process start-up and each worker's first run, which reads the cache, are left out, they are
  paid once per worker; the command's wall time in all is printed beside it);
- **storages**: the sweep loop with a run that does nothing, on SQLite (the default), a journal file and
  PostgreSQL (a throwaway server, when the `postgresql` package is installed): the storage's cost per run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

DETECTORS = ["logistic", "group_lasso"]
TOP_K = [1, 2, 4, 8, 16]


def direct_times(cache: str) -> tuple[float, float, int]:
    """The grid's LOAO runs called directly on features read once: (wall seconds, CPU seconds, runs)."""
    from sahs.data.cache import ActivationCache
    from sahs.experiments import LoaoSettings
    from sahs.experiments.loao import leave_one_attack_out
    from sahs.data.rankings import RankingStore
    from sahs.models.detectors import LogisticDetector, SparseL1Detector

    data = ActivationCache(cache)
    layout = data.layout
    # As a sweep reads it: the stored dtype, and the cache's ranking store (warm after the warm-up pass).
    features = data.read(dtype=None).view(len(data), layout["num_layers"], layout["num_heads"], -1)
    rankings = RankingStore.for_cache(data)
    attacks, groups = data.column("attack"), data.column("group" if "group" in data.columns else "id")
    wall, cpu = time.perf_counter(), time.process_time()
    for name in DETECTORS:
        spec = yaml.safe_load((ROOT / "configs" / "detector" / f"{name}.yaml").read_text())["init_args"]
        detector = LogisticDetector(**spec) if name == "logistic" else SparseL1Detector(**spec, head_dim=layout["head_dim"])
        for k in TOP_K[1:]:  # the sweep's first run is its warm-up: the same points are timed on both sides
            leave_one_attack_out(features, data.labels, attacks, LoaoSettings(top_k=k, detector=detector, seed=0),
                                 layers=data.layers, groups=groups, rankings=rankings)
    return time.perf_counter() - wall, time.process_time() - cpu, len(DETECTORS) * (len(TOP_K) - 1)


def sweep_times(cache: str, folder: Path) -> tuple[float, float, int, float]:
    """The same runs in an offline sweep's loop, after a warm-up run per detector.

    Returns (wall seconds, CPU seconds, runs) of the timed runs and the wall seconds of the warm-up:
    the sweep's first run also checks the cache's fingerprint (loading the prompt set), reads the cache
    and builds the run config's parser, once per `sahs sweep` process.
    """
    from sahs.commands.sweep import _executor, _quiet_wandb
    from sahs.experiments.records import read_records
    from sahs.experiments.sweep import run_local
    from sahs.experiments.sweep_spec import load_sweep

    spec = {"name": "bench", "program": "sahs", "method": "grid", "project": "sahs-bench",
            "metric": {"name": "loao/auroc_mean", "goal": "maximize"},
            "parameters": {"loao.top_k": {"values": TOP_K},
                           "model.detector": {"values": [f"configs/detector/{name}.yaml" for name in DETECTORS]}},
            "command": ["${program}", "loao", "--config", "configs/demo.yaml", "${args}"]}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    spec = load_sweep(path)
    sweep_dir = folder / "sweeps" / "bench"
    execute = _executor(spec, sweep_dir, [*spec.run_args, f"--data.cache_dir={cache}"], offline=True)
    quiet = lambda line: None  # noqa: E731
    with _quiet_wandb():  # as `sahs sweep` runs them
        warm = time.perf_counter()
        run_local(spec, sweep_dir, execute, count=len(DETECTORS), say=quiet)
        warm = time.perf_counter() - warm
        wall, cpu = time.perf_counter(), time.process_time()
        run_local(spec, sweep_dir, execute, say=quiet)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    records = read_records(sweep_dir)
    assert len(records) == len(DETECTORS) * len(TOP_K), len(records)
    assert all(record.status == "finished" for record in records), [record.error for record in records]
    return wall, cpu, len(records) - len(DETECTORS), warm


def worker_rate(cache: str, folder: Path, workers: int, storage: str | None = None) -> tuple[float, int, float, float]:
    """``sahs sweep --workers N`` on a 40-point grid.

    Returns runs/min while all workers ran warm, the runs counted, the command's wall seconds, and the CPU
    seconds per run of the workers (what a free core per worker would turn into runs/min).
    """
    from sahs.experiments.records import read_records

    spec = {"name": f"w{workers}-{folder.name}", "program": "sahs", "method": "grid", "project": "sahs-bench",
            "metric": {"name": "loao/auroc_mean", "goal": "maximize"},
            "parameters": {"model.detector": {"values": [f"configs/detector/{name}.yaml" for name in DETECTORS]},
                           "loao.top_k": {"values": TOP_K}, "loao.max_iter": {"values": [100, 200, 300, 1000]}},
            "command": ["${program}", "loao", "--config", "configs/demo.yaml", "${args}"]}
    path = folder / f"w{workers}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(workers)}  # split between the workers: one thread each
    wall = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sahs.cli", "sweep", str(path), "--offline", "--workers", str(workers),
                    f"--data.cache_dir={cache}", f"--trainer.default_root_dir={folder}",
                    *(["--storage", storage] if storage else [])], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - wall
    records = read_records(folder / "sweeps" / spec["name"])
    assert all(record.status == "finished" for record in records), [record.error for record in records]
    by_pid: dict[int, list] = {}
    for record in records:  # in the order the runs started
        by_pid.setdefault(record.pid, []).append(record)
    # A worker's first run is its warm-up (the cache's fingerprint and read, the run config's parser: 1.5 s
    # on the demo cache, ten runs' worth), paid once per worker: the window starts when every worker is past it.
    begin = max(rs[1].started for rs in by_pid.values())  # every worker is warm and running from here
    end = min(rs[-1].finished for rs in by_pid.values())  # ... to here
    inside = [r for r in records if r.started >= begin and r.finished <= end]
    cpu = sum(r.cpu for r in inside) / len(inside)
    return 60 * len(inside) / (end - begin), len(inside), wall, cpu


def storage_costs(folder: Path, runs: int = 40) -> dict[str, float]:
    """Seconds per run of the sweep loop around a run that does nothing, per storage."""
    from sahs.experiments.sweep import RunOutcome, run_local
    from sahs.experiments.sweep_spec import load_sweep

    spec = {"name": "noop", "program": "sahs", "method": "grid", "metric": {"name": "m", "goal": "maximize"},
            "parameters": {"x": {"values": list(range(runs))}}, "command": ["${program}", "loao", "${args}"]}
    path = folder / "noop.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    spec = load_sweep(path)
    costs = {}
    with storages(folder, "noop") as urls:
        for label, storage in urls.items():
            sweep_dir = folder / f"noop-{label.split()[0]}"
            execute = lambda params, name: RunOutcome(sweep_dir, {"m": 1.0})  # noqa: E731
            run_local(spec, sweep_dir, execute, count=1, storage=storage, say=lambda line: None)  # setup, warm-up
            wall = time.perf_counter()
            run_local(spec, sweep_dir, execute, storage=storage, say=lambda line: None)
            costs[label] = (time.perf_counter() - wall) / (runs - 1)
    return costs


@contextlib.contextmanager
def storages(folder: Path, name: str):
    """``{label: --storage value}``: SQLite (the default), a journal file, and a throwaway PostgreSQL server
    (started as the tests start it) when the ``postgresql`` package is installed."""
    urls = {"sqlite (default)": None, "journal": f"journal:{folder / (name + '.journal')}"}
    server = None
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from postgres_server import Server

        server = Server()
        urls["postgresql"] = server.url()
    except BaseException as error:  # noqa: BLE001 - no server here: the other storages are still measured
        print(f"(no PostgreSQL: {str(error).splitlines()[0] if str(error) else type(error).__name__})")
    try:
        yield urls
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "cache" / "demo"))
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: runner, workers, storages")
    parser.add_argument("--worker-storages", default="sqlite", help="comma-separated storages the workers are "
                        "measured on: sqlite (the default), journal, postgresql")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    os.chdir(ROOT)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if not (Path(args.cache) / "manifest.json").exists():
        from sahs.cli import main as sahs

        sahs(["extract", "--config", "configs/demo.yaml", f"--data.cache_dir={args.cache}"])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if "runner" not in skip:
        direct_times(args.cache)  # warm-up: imports, first fits
        before = direct_times(args.cache)
        with tempfile.TemporaryDirectory() as folder:
            swept = sweep_times(args.cache, Path(folder))
        after = direct_times(args.cache)
        n = swept[2]
        assert before[2] == after[2] == n
        direct_wall, direct_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        print(f"grid {DETECTORS} x top_k {TOP_K} on {args.cache}: {n} timed runs (after a warm-up run per detector)")
        print(f"direct LOAO:   {60 * n / direct_wall:5.1f} runs/min wall (before {60 * n / before[0]:.1f}, after "
              f"{60 * n / after[0]:.1f}); {direct_cpu / n:.2f} s CPU per run")
        print(f"offline sweep: {60 * n / swept[0]:5.1f} runs/min wall; {swept[1] / n:.2f} s CPU per run "
              f"(its first {len(DETECTORS)} runs, with the cache check and read: {swept[3]:.1f} s wall)")
        print(f"runner cost per run: {(swept[0] - direct_wall) / n:.2f} s wall, {(swept[1] - direct_cpu) / n:.2f} s "
              f"CPU of this process (sweep / direct: {swept[0] / direct_wall:.2f} wall, {swept[1] / direct_cpu:.2f} CPU)")
    if "workers" not in skip:
        with tempfile.TemporaryDirectory() as shared, storages(Path(shared), "workers") as urls:
            for label, storage in urls.items():
                if label.split()[0] not in args.worker_storages.split(","):
                    continue
                rates = []
                for workers in (1, 2, 1):  # one worker before and after: the machine's load moves in between
                    with tempfile.TemporaryDirectory() as folder:
                        rate, counted, wall, cpu = worker_rate(args.cache, Path(folder), workers, storage)
                    rates.append(rate)
                    print(f"{label}, --workers {workers}: {rate:5.1f} runs/min while all ran warm ({counted} runs); "
                          f"{cpu:.2f} s CPU per run in a worker; {wall:.0f} s in all (load average "
                          f"{os.getloadavg()[0]:.1f})")
                print(f"{label}, 2 workers / 1 worker: {2 * rates[1] / (rates[0] + rates[2]):.2f}x runs/min "
                      "(target >= 1.6x on 2 cores)")
    if "storages" not in skip:
        with tempfile.TemporaryDirectory() as folder:
            for label, cost in storage_costs(Path(folder)).items():
                print(f"storage {label}: {1000 * cost:.0f} ms per run (the loop around a run that does nothing)")


if __name__ == "__main__":
    main()
