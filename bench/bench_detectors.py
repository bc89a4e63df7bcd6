"""Fit-time benchmark: full-batch L-BFGS ``LogisticDetector.fit`` vs scikit-learn's lbfgs.

Both fit the same problem with the same penalty (``C = 1 / (l2 * n)``); each is warmed up once and
timed over several repeats in this one process, and the ratio of the medians is printed. A second
section times ``rank_heads`` on a LLaVA-7B-shaped cache (32 layers x 32 heads x 128).

    python bench/bench_detectors.py [--n 1000] [--features 1280] [--repeats 5] [--skip-probes]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from sahs.eval.probes import rank_heads
from sahs.models.detectors import LogisticDetector


def _median_seconds(fit: Callable[[], object], repeats: int) -> float:
    fit()  # warm-up: first calls pay for lazy initialization
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_logistic(n: int, features: int, l2: float, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, features, generator=generator)
    x[:, :128] += 0.3 * y[:, None]  # the first head carries the label
    x_np, y_np = x.numpy(), y.numpy()
    ours = _median_seconds(lambda: LogisticDetector(l2=l2).fit(x, y, tol=1e-6), repeats)
    sklearn = _median_seconds(lambda: LogisticRegression(C=1 / (l2 * n), tol=1e-6).fit(x_np, y_np), repeats)
    detector = LogisticDetector(l2=l2).fit(x, y, tol=1e-6)
    reference = LogisticRegression(C=1 / (l2 * n), tol=1e-6).fit(x_np, y_np)
    auroc = roc_auc_score(y_np, detector.decision_function(x))
    gap = abs(auroc - roc_auc_score(y_np, reference.decision_function(x_np)))
    coef_gap = np.abs(detector.coef_.numpy() - reference.coef_[0]).max() / np.abs(reference.coef_).max()
    print(f"logistic fit, {n} x {features}, l2={l2}, threads={torch.get_num_threads()}")
    print(f"  LogisticDetector.fit (torch L-BFGS, float32): {ours * 1e3:8.1f} ms, {detector.n_iter_} iterations")
    print(f"  sklearn LogisticRegression (lbfgs, float64): {sklearn * 1e3:8.1f} ms, {reference.n_iter_[0]} iterations")
    print(f"  ratio ours / sklearn: {ours / sklearn:.2f}")
    print(f"  |AUROC gap| {gap:.1e}, largest coefficient gap (relative) {coef_gap:.1e}")


def bench_probes(n: int, layers: int, heads: int, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.randn(n, layers, heads, head_dim, generator=generator).half()
    features[:, 12, 7, :4] += labels[:, None].half()
    rank_heads(features[:, :1, :4], labels)  # warm-up
    start = time.perf_counter()
    ranking = rank_heads(features, labels)
    seconds = time.perf_counter() - start
    print(f"rank_heads, {n} prompts x {layers} layers x {heads} heads x {head_dim} (float16)")
    print(f"  {seconds:.1f} s for {layers * heads} probes; best head {ranking.top(1)[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="prompts in the logistic problem")
    parser.add_argument("--features", type=int, default=1280, help="features (10 heads x 128)")
    parser.add_argument("--l2", type=float, default=1e-2, help="penalty of both fits")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--skip-probes", action="store_true", help="skip the rank_heads timing")
    args = parser.parse_args()
    bench_logistic(args.n, args.features, args.l2, args.repeats)
    if not args.skip_probes:
        bench_probes(2000, 32, 32, 128)


if __name__ == "__main__":
    main()
