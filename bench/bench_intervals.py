"""Cost of the AUROC intervals: the request bootstrap of a LOAO run, and the paired comparisons of a sweep summary.

    OMP_NUM_THREADS=1 python bench/bench_intervals.py [--cache outputs/cache/demo] [--n_boot 1000] [--runs 35]

On the demo cache (built with `sahs extract --config configs/demo.yaml` when missing), the intervals
alone (every fold and the fold mean, B = n_boot) are timed on a run's own scores, and warm LOAO runs
(logistic and group lasso, top_k 8, rankings reused) with B = 1 and B = n_boot: the intervals' share of
the run is the figure (target <= 10%; CPU time, the least of --repeats calls). Then the paired differences that a summary of --runs runs computes against its best.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(repeats: int, call) -> float:
    """The least CPU time of ``repeats`` calls (seconds): the least disturbed by a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "cache" / "demo"))
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=35, help="runs of the sweep whose summary is timed")
    parser.add_argument("--repeats", type=int, default=15, help="timings per figure (the fastest is kept)")
    args = parser.parse_args()
    os.chdir(ROOT)
    if not (Path(args.cache) / "manifest.json").exists():
        from sahs.cli import main as sahs

        sahs(["extract", "--config", "configs/demo.yaml", f"--data.cache_dir={args.cache}"])

    import numpy as np

    from sahs.data.cache import ActivationCache
    from sahs.data.rankings import RankingStore
    from sahs.eval.intervals import Part, paired_differences, repeated_mean_auroc
    from sahs.experiments import LoaoSettings
    from sahs.experiments.loao import leave_one_attack_out
    from sahs.models.detectors import LogisticDetector, SparseL1Detector

    data = ActivationCache(args.cache)
    layout = data.layout
    features = data.read(dtype=None).view(len(data), layout["num_layers"], layout["num_heads"], -1)
    attacks, groups = data.column("attack"), data.column("group" if "group" in data.columns else "id")
    rankings = RankingStore.for_cache(data)
    detectors = {"logistic": LogisticDetector(l2=1e-2),
                 "group lasso": SparseL1Detector(l1=1e-3, group_lasso=True, head_dim=layout["head_dim"])}

    def run(detector, n_boot):
        settings = LoaoSettings(top_k=8, detector=detector, n_boot=n_boot)
        return leave_one_attack_out(features, data.labels, attacks, settings, layers=data.layers, groups=groups,
                                    rankings=rankings)

    result = run(detectors["logistic"], args.n_boot)  # warm: rankings stored, imports done
    labels = data.labels.numpy()
    parts = [fold.part(labels, np.asarray(groups, dtype=str)) for fold in result.folds]
    n_test = sum(len(part.scores) for part in parts)
    print(f"{args.cache}: {len(labels)} prompts, {len(parts)} folds, {n_test} test rows, "
          f"{len(np.unique(groups))} requests; B = {args.n_boot}; load average {os.getloadavg()[0]:.1f}; "
          f"CPU seconds, the least of {args.repeats} calls")
    intervals = best_of(args.repeats, lambda: repeated_mean_auroc([parts], args.n_boot, 0, 0.95))
    print(f"the intervals alone (every fold and the mean): {intervals * 1e3:.1f} ms")
    for name, detector in detectors.items():
        run(detector, 1)
        bare = best_of(args.repeats, lambda: run(detector, 1))
        full = best_of(args.repeats, lambda: run(detector, args.n_boot))
        print(f"warm LOAO run, {name}, top_k 8: {bare * 1e3:.1f} ms with B = 1, {full * 1e3:.1f} ms with B = "
              f"{args.n_boot}: the intervals cost {100 * intervals / bare:.1f}% of the run (target <= 10%)")
    rng = np.random.default_rng(0)
    others = [[Part(p.scores + 0.3 * rng.standard_normal(len(p.scores)), p.labels, p.groups) for p in parts]
              for _ in range(args.runs - 1)]
    summary = best_of(max(1, args.repeats // 2), lambda: paired_differences(parts, others, args.n_boot))
    print(f"paired differences of {args.runs - 1} runs to the best (a summary of {args.runs} runs): "
          f"{summary * 1e3:.1f} ms ({summary / (args.runs - 1) * 1e3:.1f} ms per run)")


if __name__ == "__main__":
    main()
