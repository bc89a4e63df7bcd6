"""Sweep runner overhead: an offline `sahs sweep` against the same leave-one-attack-out runs called directly.

    OMP_NUM_THREADS=1 python bench/bench_sweep.py [--cache outputs/cache/demo] [--rounds 1]

On the demo cache (built with `sahs extract --config configs/demo.yaml` when missing), a grid of
detector x head count runs three ways in one process: direct `leave_one_attack_out` calls on features
read once (before), the same grid through the offline sweep's loop (what `sahs sweep` runs: Optuna,
one run folder, config, W&B offline run, record and summary table per run), and the direct calls again
(after). It prints runs per
minute and the runner's cost per run, in wall time and in this process's CPU time (steadier on a
shared machine; W&B's own writer process is not counted), against the mean of before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    from sahs.commands.sweep import _executor
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
    os.environ["WANDB__SAVE_REQUIREMENTS"] = "false"  # as `sahs sweep` sets it
    execute = _executor(spec, sweep_dir, [*spec.run_args, f"--data.cache_dir={cache}"], offline=True)
    quiet = lambda line: None  # noqa: E731
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "cache" / "demo"))
    args = parser.parse_args()
    os.chdir(ROOT)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if not (Path(args.cache) / "manifest.json").exists():
        from sahs.cli import main as sahs

        sahs(["extract", "--config", "configs/demo.yaml", f"--data.cache_dir={args.cache}"])
    direct_times(args.cache)  # warm-up: imports, first fits
    before = direct_times(args.cache)
    with tempfile.TemporaryDirectory() as folder:
        swept = sweep_times(args.cache, Path(folder))
    after = direct_times(args.cache)
    n = swept[2]
    assert before[2] == after[2] == n
    direct_wall, direct_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    print(f"grid {DETECTORS} x top_k {TOP_K} on {args.cache}: {n} timed runs (after a warm-up run per detector)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"direct LOAO:   {60 * n / direct_wall:5.1f} runs/min wall (before {60 * n / before[0]:.1f}, after "
          f"{60 * n / after[0]:.1f}); {direct_cpu / n:.2f} s CPU per run")
    print(f"offline sweep: {60 * n / swept[0]:5.1f} runs/min wall; {swept[1] / n:.2f} s CPU per run "
          f"(its first {len(DETECTORS)} runs, with the cache check and read: {swept[3]:.1f} s wall)")
    print(f"runner cost per run: {(swept[0] - direct_wall) / n:.2f} s wall, {(swept[1] - direct_cpu) / n:.2f} s CPU "
          f"of this process (sweep / direct: {swept[0] / direct_wall:.2f} wall, {swept[1] / direct_cpu:.2f} CPU)")


if __name__ == "__main__":
    main()
