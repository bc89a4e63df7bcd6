"""Training-side speed, side by side in one run: head ranking, detector fits, sweep runs, LOAO memory.

Every timing is process CPU time of this single-threaded process (steadier than wall time on a
shared machine; both are printed), repeated, with the ratio taken within each repeat and the median
printed. Sections:

1. The machine: one-thread float32 matmul rate, the yardstick for the ranking's GFLOP/s.
2. ``rank_heads`` against the reference recipe (``StandardScaler`` + scikit-learn
   ``LogisticRegression`` per head on the same split) on a LLaVA-7B-shaped cache: 2,000 prompts x
   32 layers x 32 heads x 128, float16, twelve heads carrying the label at graded strengths.
   Agreement: Spearman correlation of the 1,024 AUROCs and the same top 8.
3. ``LogisticDetector.fit`` against scikit-learn's lbfgs on 1,000 x 1,280, same objective and tolerance.
   The other detectors' fits side by side with scikit-learn on the same standardized features:
   ``MLPDetector`` against ``MLPClassifier(solver="lbfgs")`` (same width, ``alpha = l2 * n``, same
   seed for both), ``SparseL1Detector`` against ``LogisticRegression(l1_ratio=1, solver="saga")``,
   the group lasso against the logistic fit; with ``--cache DIR`` also whole LOAO runs per detector
   on that activation cache (rankings reused), as ratios to the logistic run.
4. Sweep runs: leave-one-attack-out (five families) on the 7B-shaped cache; a cold run ranks every
   fold (what each run cost before rankings were kept), then runs that vary only top_k or the
   detector's regularization reuse the stored rankings: runs per minute.
5. Memory: ``sahs loao``'s path on a 10,000-prompt 7B-shaped cache on disk (2.6 GB of float16):
   read it through ``ActivationCache.read`` in float16 and run LOAO, in a fresh process; peak
   resident memory (``VmHWM``) against the size of the features.

    OMP_NUM_THREADS=1 python bench/bench_training.py [--repeats 3] [--small] [--skip-memory]
        [--cache outputs/cache/minilm] [--only fits|ranking]

With ``THP_MEM_ALLOC_ENABLE=1`` in the environment torch backs large tensors with huge pages, which
speeds up the scattered row gathers of the sweep runs (the machine section says which was measured).

``--small`` shrinks the big cases (1,000 prompts in section 2 and 4, 2,000 in section 5) for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from sahs.data.splits import split_rows  # noqa: E402
from sahs.eval.probes import rank_heads  # noqa: E402
from sahs.experiments import LoaoSettings  # noqa: E402
from sahs.experiments.loao import leave_one_attack_out  # noqa: E402
from sahs.data.rankings import RankingStore  # noqa: E402
from sahs.models.detectors import LogisticDetector, MLPDetector, SparseL1Detector  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 32, 128
FAMILIES = ("figstep", "hades", "mmsafety", "qr", "text")


def _timed(work: Callable[[], object]) -> tuple[float, float, object]:
    """``(cpu_seconds, wall_seconds, result)`` of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def seven_b_cache(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``[n, 32, 32, 128]`` float16 activations, labels and five attack families; 12 graded signal heads."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.empty(n, LAYERS, HEADS, HEAD_DIM, dtype=torch.float16)
    for start in range(0, n, 500):  # generated in slices: no float32 copy of the whole cache
        stop = min(start + 500, n)
        features[start:stop] = torch.randn(stop - start, LAYERS, HEADS, HEAD_DIM, generator=generator).half()
    for rank in range(12):
        layer, head = 4 + 2 * rank, (7 * rank) % HEADS
        direction = torch.randn(HEAD_DIM, generator=generator)
        shift = (0.9 - 0.05 * rank) * labels[:, None] * direction / direction.norm()
        features[:, layer, head] += shift.half()
    attacks = np.asarray(FAMILIES)[np.arange(n) % len(FAMILIES)]
    return features, labels, attacks


def bench_machine() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    rates = []
    for _ in range(5):
        cpu, _, _ = _timed(lambda: a @ b)
        rates.append(2 * 2048**3 / cpu / 1e9)
    rate = statistics.median(rates)
    huge_pages = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
    print(f"machine: float32 matmul 2048^3 on {torch.get_num_threads()} thread(s): {rate:.0f} GFLOP/s (median of 5); "
          f"torch huge pages (THP_MEM_ALLOC_ENABLE) {'on' if huge_pages else 'off'}")
    return rate


def _sklearn_ranking(features: torch.Tensor, labels: torch.Tensor, l2: float, seed: int) -> np.ndarray:
    """The reference recipe: one StandardScaler + LogisticRegression per head on rank_heads' split."""
    fit_rows, holdout_rows = split_rows(labels, [0.3], seed, part="head ranking rows", both_classes=True)
    fit_rows, holdout_rows = fit_rows.numpy(), holdout_rows.numpy()
    flat = features.flatten(1, 2)
    y_fit, y_holdout = labels.numpy()[fit_rows], labels.numpy()[holdout_rows]
    scores = np.empty(flat.shape[1])
    for index in range(flat.shape[1]):
        x = flat[:, index].float().numpy()
        scaler = StandardScaler().fit(x[fit_rows])
        probe = LogisticRegression(C=1 / (l2 * len(fit_rows))).fit(scaler.transform(x[fit_rows]), y_fit)
        scores[index] = roc_auc_score(y_holdout, probe.decision_function(scaler.transform(x[holdout_rows])))
    return scores


def bench_ranking(n: int, repeats: int, matmul_rate: float) -> dict[str, float]:
    features, labels, _ = seven_b_cache(n)
    rank_heads(features[:, :1, :4], labels)  # warm-up
    n_fit = round(0.7 * n)
    gflop = LAYERS * HEADS * 2 * n_fit * (HEAD_DIM + 1) ** 2 / 1e9  # the per-head [129 x 129] Gram matrices
    ratios, ours_cpu = [], []
    for _ in range(repeats):
        cpu, wall, ranking = _timed(lambda: rank_heads(features, labels))
        ref_cpu, ref_wall, reference = _timed(lambda: _sklearn_ranking(features, labels, 1e-2, 0))
        ratios.append(ref_cpu / cpu)
        ours_cpu.append(cpu)
        top = {layer * HEADS + head for layer, head in ranking.top(8)}
        same_top = top == set(np.argsort(-reference, kind="stable")[:8].tolist())
        rho = spearmanr(reference, ranking.auroc.flatten().numpy())[0]
        print(f"  rank_heads {cpu:.2f} s cpu ({wall:.2f} wall) | sklearn per head {ref_cpu:.2f} s cpu "
              f"({ref_wall:.2f} wall) | ratio {ref_cpu / cpu:.2f} | Spearman {rho:.4f} | same top 8: {same_top}")
    cpu = statistics.median(ours_cpu)
    print(f"rank_heads, {n} prompts x {LAYERS} x {HEADS} x {HEAD_DIM} float16, one thread: "
          f"median {cpu:.2f} s, {statistics.median(ratios):.2f}x faster than the sklearn loop "
          f"(target >= 5x); Gram work {gflop:.1f} GFLOP -> {gflop / cpu:.0f} GFLOP/s over the whole ranking "
          f"vs {matmul_rate:.0f} GFLOP/s matmul = {gflop / cpu / matmul_rate:.0%} of it (target >= 60%)")
    return {"ranking_s": cpu, "ranking_ratio": statistics.median(ratios), "ranking_gflops": gflop / cpu,
            "ranking_over_matmul": gflop / cpu / matmul_rate}


def bench_fit(repeats: int, n: int = 1000, features: int = 1280, l2: float = 1e-2) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, features, generator=generator)
    x[:, :128] += 0.3 * y[:, None]  # the first head carries the label
    x_np, y_np = x.numpy(), y.numpy()
    ours = lambda: LogisticDetector(l2=l2).fit(x, y, tol=1e-6)  # noqa: E731
    theirs = lambda: LogisticRegression(C=1 / (l2 * n), tol=1e-6).fit(x_np, y_np)  # noqa: E731
    ours(), theirs()  # warm-up
    ratios, ours_cpu, ref_cpu = [], [], []
    for _ in range(max(repeats, 5)):
        a, _, detector = _timed(ours)
        b, _, reference = _timed(theirs)
        ratios.append(a / b)
        ours_cpu.append(a)
        ref_cpu.append(b)
    gap = abs(roc_auc_score(y_np, detector.decision_function(x))
              - roc_auc_score(y_np, reference.decision_function(x_np)))
    coef_gap = np.abs(detector.coef_.numpy() - reference.coef_[0]).max() / np.abs(reference.coef_).max()
    print(f"LogisticDetector.fit, {n} x {features}, l2={l2}, tol 1e-6: "
          f"median {statistics.median(ours_cpu) * 1e3:.1f} ms "
          f"cpu ({detector.n_iter_} iterations) vs sklearn lbfgs {statistics.median(ref_cpu) * 1e3:.1f} ms "
          f"({reference.n_iter_[0]} iterations): ratio ours/sklearn {statistics.median(ratios):.2f} (target <= 1); "
          f"|AUROC gap| {gap:.1e}, largest coefficient gap {coef_gap:.1e} (relative)")
    return {"fit_ratio": statistics.median(ratios)}


def _fold_features(cache_dir: str | None, top_k: int, n: int = 1200) -> tuple[torch.Tensor, torch.Tensor, slice | tuple]:
    """Standardized features ``[rows, top_k * head_dim]``, labels and (fit rows, test rows).

    From ``cache_dir``: the first LOAO fold's training rows, its own ranking's ``top_k`` heads and its
    test rows. Otherwise synthetic heads of 32 dimensions: shared low-rank structure, one planted
    direction spread over eight heads and a nonlinear part, the first half fitting.
    """
    if cache_dir is not None:
        from sahs.data.cache import ActivationCache
        from sahs.experiments.loao import loao_folds

        cache = ActivationCache(cache_dir)
        layout = cache.layout
        features = cache.read(dtype=None).view(len(cache), len(cache.layers), layout["num_heads"], layout["head_dim"])
        labels, attacks, groups = cache.labels, cache.column("attack"), cache.column("group")
        fold = loao_folds(labels, attacks, groups, seed=0)[0]
        ranking = RankingStore.for_cache(cache).rank(features, labels, rows=fold.train_rows, layers=list(cache.layers),
                                                     attacks=attacks, groups=groups)
        x = torch.cat([features[:, layer, head].float() for layer, head in ranking.top(top_k)], dim=1)
        fit_rows, test_rows = fold.train_rows, fold.test_rows
    else:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (n,), generator=generator)
        d = 32 * top_k
        x = torch.randn(n, 16, generator=generator) @ torch.randn(16, d, generator=generator) / 4
        x += torch.randn(n, d, generator=generator)
        direction = torch.zeros(d)
        direction[: min(d, 256)] = torch.randn(min(d, 256), generator=generator)
        x += 1.5 * labels[:, None] * direction / direction.norm()
        x[:, 0] += 0.5 * x[:, 1].abs() * (2 * labels - 1)
        fit_rows, test_rows = torch.arange(n // 2), torch.arange(n // 2, n)
    mean, std = x[fit_rows].mean(0), x[fit_rows].std(0, unbiased=False).clamp_min(1e-6)
    return (x - mean) / std, labels, (fit_rows, test_rows)


def _auroc(y: torch.Tensor, scores) -> float:
    return roc_auc_score(y.numpy(), np.asarray(scores))


def bench_detector_fits(repeats: int, cache_dir: str | None) -> dict[str, float]:
    """MLP, L1 and group-lasso fits side by side with scikit-learn on the same standardized features."""
    import warnings

    where = cache_dir or "synthetic heads"
    figures = {}
    x, y, (fit, test) = _fold_features(cache_dir, top_k=8)
    n = len(fit)
    x_fit, y_fit, x_np, y_np = x[fit], y[fit], x[fit].numpy(), y[fit].numpy()
    l2 = 1e-3
    ratios, ours_auroc, ref_auroc, lines = [], [], [], []
    for seed in range(max(repeats, 3)):
        torch.manual_seed(seed)
        cpu, _, detector = _timed(lambda: MLPDetector(hidden=[64], l2=l2).fit(x_fit, y_fit))
        reference = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", alpha=l2 * n, max_iter=1000,
                                  random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its ConvergenceWarning at max_iter: the iterations are printed
            ref_cpu, _, reference = _timed(lambda: reference.fit(x_np, y_np))
        ratios.append(cpu / ref_cpu)
        ours_auroc.append(_auroc(y[test], detector.decision_function(x[test])))
        ref_auroc.append(_auroc(y[test], reference.predict_proba(x[test].numpy())[:, 1]))
        lines.append(f"    seed {seed}: ours {cpu:.3f} s ({detector.n_iter_} iterations, converged {detector.converged_}, "
                     f"objective {detector.loss_:.5f}, AUROC {ours_auroc[-1]:.4f}) | sklearn {ref_cpu:.3f} s "
                     f"({reference.n_iter_} iterations, objective {reference.loss_:.5f}, AUROC {ref_auroc[-1]:.4f})")
    gap = abs(statistics.mean(ours_auroc) - statistics.mean(ref_auroc))
    print(f"MLPDetector(hidden=[64], l2={l2}).fit vs MLPClassifier(solver='lbfgs', alpha=l2*n), {n} x {x.shape[1]} "
          f"({where}, top 8 heads):")
    print("\n".join(lines))
    print(f"  time ratio ours/sklearn median {statistics.median(ratios):.2f} (target <= 1.0); "
          f"mean test AUROC {statistics.mean(ours_auroc):.4f} vs {statistics.mean(ref_auroc):.4f}, "
          f"|gap| {gap:.4f} (target <= 0.005)")
    figures.update(mlp_ratio=statistics.median(ratios), mlp_auroc_gap=gap)

    x, y, (fit, test) = _fold_features(cache_dir, top_k=72 if cache_dir else 32)
    n, x_fit, y_fit = len(fit), x[fit], y[fit]
    l1 = 0.01
    fits = {
        "logistic l2=1e-3": lambda: LogisticDetector(l2=1e-3).fit(x_fit, y_fit),
        "L1 l1=0.01": lambda: SparseL1Detector(l1=l1).fit(x_fit, y_fit),
        "group lasso l1=0.01": lambda: SparseL1Detector(l1=l1, group_lasso=True, head_dim=32).fit(x_fit, y_fit),
        "MLP [64]": lambda: MLPDetector(hidden=[64], l2=1e-3).fit(x_fit, y_fit),
        "MLP [128, 128]": lambda: MLPDetector(hidden=[128, 128], l2=1e-3).fit(x_fit, y_fit),
    }
    times = {}
    print(f"full-batch fits on {n} x {x.shape[1]} ({where}), median of {max(repeats, 3)}:")
    for name, work in fits.items():
        runs = []
        for seed in range(max(repeats, 3)):
            torch.manual_seed(seed)
            runs.append(_timed(work))
        times[name] = statistics.median(cpu for cpu, _, _ in runs)
        detector = runs[-1][2]
        print(f"  {name:20s} {times[name]:.3f} s ({detector.n_iter_} iterations, converged {detector.converged_}, "
              f"objective {detector.loss_:.6f}, test AUROC {_auroc(y[test], detector.decision_function(x[test])):.4f}) "
              f"= {times[name] / times['logistic l2=1e-3']:.1f}x the logistic fit")
    reference = LogisticRegression(l1_ratio=1, C=1 / (l1 * n), solver="saga", max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_cpu, _, reference = _timed(lambda: reference.fit(x_fit.numpy(), y_fit.numpy()))
    ours = SparseL1Detector(l1=l1).fit(x_fit, y_fit)
    w, b = torch.as_tensor(reference.coef_[0], dtype=torch.float64), float(reference.intercept_[0])
    logits = x_fit.double() @ w + b
    ref_objective = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y_fit.double())) + l1 * float(w.abs().sum())
    print(f"  sklearn saga L1 (tol 1e-4) {ref_cpu:.3f} s ({reference.n_iter_[0]} epochs, objective {ref_objective:.6f}, "
          f"test AUROC {_auroc(y[test], reference.decision_function(x[test].numpy())):.4f}): "
          f"L1 fit / saga time ratio {times['L1 l1=0.01'] / ref_cpu:.2f}; objective ours - saga {ours.loss_ - ref_objective:.1e}")
    figures.update(l1_over_saga=times["L1 l1=0.01"] / ref_cpu,
                   group_lasso_over_logistic=times["group lasso l1=0.01"] / times["logistic l2=1e-3"])
    return figures


def bench_loao_runs(cache_dir: str, top_ks: tuple[int, ...] = (1, 8, 72)) -> dict[str, float]:
    """Whole LOAO runs per detector on a cache (rankings reused), as ratios to the logistic run at the same top_k."""
    import warnings

    from sahs.data.cache import ActivationCache

    cache = ActivationCache(cache_dir)
    layout = cache.layout
    features = cache.read(dtype=None).view(len(cache), len(cache.layers), layout["num_heads"], layout["head_dim"])
    columns = (features, cache.labels, cache.column("attack"))
    where = dict(groups=cache.column("group"), layers=list(cache.layers), rankings=RankingStore.for_cache(cache))
    leave_one_attack_out(*columns, LoaoSettings(top_k=1), **where)  # rank every fold once
    detectors = {"logistic": lambda: LogisticDetector(l2=1e-3), "sparse_l1": lambda: SparseL1Detector(l1=0.01),
                 "group_lasso": lambda: SparseL1Detector(l1=0.01, group_lasso=True, head_dim=layout["head_dim"]),
                 "mlp": lambda: MLPDetector(hidden=[64]), "mlp_deep": lambda: MLPDetector(hidden=[128, 128])}
    figures, total = {}, 0.0
    print(f"LOAO runs on {cache_dir} ({len(cache)} prompts), rankings reused, cpu seconds (ratio to logistic):")
    for k in top_ks:
        seconds, not_converged = {}, {}
        for name, make in detectors.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                seconds[name], _, _ = _timed(lambda: leave_one_attack_out(
                    *columns, LoaoSettings(top_k=k, detector=make()), **where))
            not_converged[name] = sum("max_iter" in str(w.message) for w in caught)
        total += sum(seconds.values())
        print(f"  top_k {k:3d}: " + ", ".join(f"{name} {t:.2f} s ({t / seconds['logistic']:.1f}x"
                                               f"{', %d folds hit max_iter' % not_converged[name] if not_converged[name] else ''})"
                                               for name, t in seconds.items()))
        figures[f"loao_mlp_over_logistic[top_k {k}]"] = seconds["mlp"] / seconds["logistic"]
        figures[f"loao_group_lasso_over_logistic[top_k {k}]"] = seconds["group_lasso"] / seconds["logistic"]
    print(f"  all {len(top_ks) * len(detectors)} runs: {total:.1f} s cpu")
    return figures


def bench_sweep(n: int, repeats: int) -> dict[str, float]:
    features, labels, attacks = seven_b_cache(n, seed=1)
    store = RankingStore(None, {"bench": "seven_b", "n": n}, [str(i) for i in range(n)])
    base = LoaoSettings(top_k=8, detector=LogisticDetector(l2=1e-2))
    cold, _, _ = _timed(lambda: leave_one_attack_out(features, labels, attacks, base, rankings=store))
    print(f"LOAO on {n} prompts x 1,024 heads, {len(FAMILIES)} folds: a cold run (ranks every fold, as every run did "
          f"before) {cold:.1f} s cpu = {60 / cold:.1f} runs/min")
    results = {"cold_runs_per_min": 60 / cold}
    l2s = (1e-2, 1e-1, 1.0)
    for name, settings in [("top_k 8, l2 0.01..1", [base.with_(detector=LogisticDetector(l2=l2)) for l2 in l2s]),
                           ("top_k 64, l2 0.01..1", [base.with_(top_k=64, detector=LogisticDetector(l2=l2))
                                                     for l2 in l2s])]:
        seconds = []
        for settings_one in settings * repeats:
            cpu, _, _ = _timed(lambda: leave_one_attack_out(features, labels, attacks, settings_one, rankings=store))
            seconds.append(cpu)
        per_run = statistics.median(seconds)
        print(f"  runs varying only the detector ({name}), rankings reused: {per_run:.2f} s cpu per run = "
              f"{60 / per_run:.0f} runs/min (target >= 30); rankings computed {store.computed}, reused {store.reused}")
        results[f"runs_per_min[{name}]"] = 60 / per_run
    return results


_MEMORY_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from sahs.data.cache import ActivationCache
from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out
from sahs.data.rankings import RankingStore
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
cache = ActivationCache(sys.argv[1])
baseline = hwm()
features = cache.read(dtype=None).view(len(cache), 32, 32, 128)  # what `sahs loao` reads: float16
after_read = hwm()
result = leave_one_attack_out(features, cache.labels, cache.column("attack"), LoaoSettings(top_k=16),
                              rankings=RankingStore.for_cache(cache))
print(json.dumps(dict(baseline=baseline, after_read=after_read, peak=hwm(), features=features.numel() * 2,
                      auroc_mean=result.auroc_mean)))
"""


def write_seven_b_cache(root: Path, n: int, make_slice: Callable, shard_size: int) -> None:
    """A 7B-shaped cache of ``n`` prompts, written in slices of 1,000 from ``make_slice(n, seed)`` (features,
    labels, attacks): the writer never holds the whole cache."""
    from sahs.data import cache as cache_io

    cache_io.prepare_folder(root, {"bench": "seven_b", "n": n}, rebuild=False)
    layout = {"num_layers": LAYERS, "num_heads": HEADS, "head_dim": HEAD_DIM, "layers": list(range(LAYERS))}
    writer = cache_io.ShardWriter(root, layout, shard_size=shard_size)
    records = []
    for start in range(0, n, 1000):
        features, labels, attacks = make_slice(min(1000, n - start), seed=start)
        ids = [f"p{start + i}" for i in range(len(labels))]
        writer.add(ids, features)
        records += [{"id": i, "label": int(y), "attack": str(a)} for i, y, a in zip(ids, labels.tolist(), attacks)]
    writer.close()
    cache_io.write_manifest(root, records)


def bench_memory(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "cache"
        write_seven_b_cache(root, n, seven_b_cache, shard_size=256)
        _, wall, run = _timed(lambda: subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(root)], check=True,
                                                     capture_output=True, text=True))
        figures = json.loads(run.stdout.strip().splitlines()[-1])
    gib = 2**30
    peak, size = figures["peak"], figures["features"]
    print(f"LOAO memory, {n} prompts x 1,024 heads x 128 float16 = {size / gib:.2f} GiB of features, read from a cache "
          f"on disk: peak RSS {peak / gib:.2f} GiB = {peak / size:.2f}x the features (target <= 1.5x); "
          f"python + torch alone {figures['baseline'] / gib:.2f} GiB, "
          f"after reading {figures['after_read'] / gib:.2f} GiB; "
          f"a cold LOAO run took {wall:.0f} s wall")
    return {"peak_rss_gib": peak / gib, "peak_over_features": peak / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each comparison")
    parser.add_argument("--small", action="store_true", help="shrink the big cases for a quick look")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 10,000-prompt memory case")
    parser.add_argument("--cache", help="an activation cache: its folds' features for the detector fits, and LOAO runs")
    parser.add_argument("--only", choices=["fits", "ranking"], help="run only the detector fits, or only the "
                        "ranking against the sklearn loop and the matmul rate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {}
    if args.only in (None, "ranking"):
        figures["matmul_gflops"] = bench_machine()
        figures.update(bench_ranking(1000 if args.small else 2000, args.repeats, figures["matmul_gflops"]))
    if args.only is None:
        figures.update(bench_fit(args.repeats))
    if args.only in (None, "fits"):
        figures.update(bench_detector_fits(args.repeats, args.cache))
        if args.cache is not None:
            figures.update(bench_loao_runs(args.cache))
    if args.only is None:
        figures.update(bench_sweep(1000 if args.small else 2000, 1 if args.small else args.repeats))
    if args.only is None and not args.skip_memory:
        figures.update(bench_memory(2000 if args.small else 10_000))
    print(json.dumps({name: round(value, 3) for name, value in figures.items()}))


if __name__ == "__main__":
    main()
