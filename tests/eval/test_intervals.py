"""Request-bootstrap intervals against plain numpy loops and scikit-learn, coverage, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sahs.eval.intervals import (Estimate, Part, bootstrap_auroc, bootstrap_mean_auroc, draw_dtype, draw_requests,
                                 paired_difference, repeated_mean_auroc, weighted_auroc)


def grouped_scores(n_groups: int, size: int, shift: float, spread: float, seed: int, ties: bool = False):
    """Requests of ``size`` rows sharing a label and a random request effect of sd ``spread``."""
    rng = np.random.default_rng(seed)
    group_labels = rng.permutation(np.arange(n_groups) % 2)
    effect = spread * rng.standard_normal(n_groups)
    groups = np.repeat(np.arange(n_groups), size)
    labels = group_labels[groups]
    scores = shift * labels + effect[groups] + rng.standard_normal(len(groups))
    if ties:
        scores = np.round(scores, 0)
    return scores, labels, np.array([f"r{g:03d}" for g in groups])


def loop_replicates(parts: list[Part], n_boot: int, seed: int) -> np.ndarray:
    """The draw order documented in sahs.eval.intervals, one replicate at a time, AUROC by scikit-learn."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple[int, int], list[str]] = {}
    for index, part in enumerate(parts):
        for group in sorted(set(part.groups.tolist())):
            cls = int(part.labels[part.groups == group].max())
            strata.setdefault((index, cls), []).append(group)
    drawn = {key: rng.integers(0, len(members), size=(n_boot, len(members)), dtype=draw_dtype(len(members)))
             for key, members in sorted(strata.items())}
    out = np.empty((n_boot, len(parts)))
    for b in range(n_boot):
        chosen = [strata[key][i] for key in sorted(strata) for i in drawn[key][b]]
        for index, part in enumerate(parts):
            rows = np.concatenate([np.flatnonzero(part.groups == g) for g in chosen])
            out[b, index] = roc_auc_score(part.labels[rows], part.scores[rows])
    return out


@pytest.mark.parametrize("method", ["matrix", "cumsum"])
@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auroc_is_the_auroc_of_the_rows_repeated_by_their_weights(method, ties) -> None:
    scores, labels, _ = grouped_scores(30, 3, 1.0, 0.5, seed=0, ties=ties)
    rng = np.random.default_rng(1)
    weights = rng.integers(0, 4, size=(len(scores), 5)).astype(float)
    got = weighted_auroc(scores, labels, weights, method)
    for b in range(5):
        rows = np.repeat(np.arange(len(scores)), weights[:, b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)
    weights[labels == 1, 0] = 0  # a replicate without a positive has no AUROC
    assert np.isnan(weighted_auroc(scores, labels, weights, method)[0])


def test_one_fold_interval_matches_a_numpy_loop_over_the_same_draws() -> None:
    scores, labels, groups = grouped_scores(24, 3, 1.0, 0.7, seed=2, ties=True)
    part = Part.of(scores, labels, groups)
    expected = loop_replicates([part], n_boot=200, seed=5)[:, 0]
    estimate = bootstrap_auroc(scores, labels, groups, n_boot=200, seed=5, level=0.9)
    assert estimate.value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert estimate.low == pytest.approx(np.percentile(expected, 5), abs=1e-12)
    assert estimate.high == pytest.approx(np.percentile(expected, 95), abs=1e-12)
    assert estimate.level == 0.9 and estimate.low < estimate.value < estimate.high


def test_mean_over_folds_resamples_each_fold_within_itself() -> None:
    parts = [Part.of(*grouped_scores(16 + 4 * i, 2, 0.8 + 0.3 * i, 0.5, seed=10 + i)) for i in range(3)]
    parts = [Part(p.scores, p.labels, np.char.add(f"f{i}-", p.groups)) for i, p in enumerate(parts)]
    expected = loop_replicates(parts, n_boot=150, seed=3)
    mean, per_fold = bootstrap_mean_auroc(parts, n_boot=150, seed=3)
    assert mean.value == pytest.approx(np.mean([roc_auc_score(p.labels, p.scores) for p in parts]), abs=1e-12)
    assert (mean.low, mean.high) == pytest.approx(tuple(np.percentile(expected.mean(axis=1), [2.5, 97.5])), abs=1e-12)
    for i, fold in enumerate(per_fold):
        assert (fold.low, fold.high) == pytest.approx(tuple(np.percentile(expected[:, i], [2.5, 97.5])), abs=1e-12)
    # Strata keep each fold's size: every replicate draws exactly as many requests as the fold holds.
    resample = draw_requests(parts, n_boot=150, seed=3)
    for part in parts:
        rows = np.unique(resample.rows_of(part.groups))
        assert len(rows) == len(set(part.groups.tolist())) and (resample.counts[rows].sum(axis=0) == len(rows)).all()


def test_repeats_that_test_the_same_rows_alike_give_the_single_run_interval() -> None:
    parts = [Part.of(*grouped_scores(20, 2, 1.0, 0.5, seed=i)) for i in range(2)]
    parts = [Part(p.scores, p.labels, np.char.add(f"f{i}-", p.groups)) for i, p in enumerate(parts)]
    single, _ = bootstrap_mean_auroc(parts, n_boot=300, seed=1)
    assert repeated_mean_auroc([parts, parts[::-1]], n_boot=300, seed=1)[0] == single


def test_paired_difference_finds_the_better_detector_and_not_a_difference_of_noise() -> None:
    rng = np.random.default_rng(0)
    parts, good, bad, twin = [], [], [], []
    for fold in range(3):
        _, labels, groups = grouped_scores(60, 2, 0.0, 0.0, seed=fold)
        groups = np.char.add(f"f{fold}-", groups)
        good.append(Part.of(labels * 1.5 + rng.standard_normal(len(labels)), labels, groups))
        bad.append(Part.of(labels * 0.5 + rng.standard_normal(len(labels)), labels, groups))
        twin.append(Part.of(labels * 1.5 + rng.standard_normal(len(labels)), labels, groups))
    better = paired_difference(good, bad, n_boot=500, seed=0)
    assert better.low > 0 and better.value > 0.15
    worse = paired_difference(bad, good, n_boot=500, seed=0)
    assert worse.high < 0 and worse.value == pytest.approx(-better.value)
    assert paired_difference(good, good, n_boot=100) == Estimate(0.0, 0.0, 0.0, 0.95)
    assert paired_difference(good, twin, n_boot=500, seed=0).contains(0.0)  # same quality: no difference
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(good, good[::-1], n_boot=10)


def test_an_interval_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_auroc([0.1, 0.2, 0.3], [1, 1, 1])
    assert Estimate(0.5, 0.4, 0.6).as_dict("loao/auroc_mean") == {
        "loao/auroc_mean": 0.5, "loao/auroc_mean_ci_low": 0.4, "loao/auroc_mean_ci_high": 0.6}


@pytest.mark.slow
def test_request_intervals_cover_the_true_auroc_and_row_intervals_do_not() -> None:
    """Scores share a request effect (sd 1): the AUROC of the population is Phi(shift / sqrt(2 * (1 + 1)))."""
    shift, spread, trials = 1.0, 1.0, 300
    truth = 0.5 * (1 + math.erf(shift / math.sqrt(2 * (1 + spread**2)) / math.sqrt(2)))
    covered_requests = covered_rows = 0
    for seed in range(trials):
        scores, labels, groups = grouped_scores(80, 5, shift, spread, seed=1000 + seed)
        covered_requests += bootstrap_auroc(scores, labels, groups, n_boot=400, seed=seed).contains(truth)
        covered_rows += bootstrap_auroc(scores, labels, None, n_boot=400, seed=seed).contains(truth)
    # 300 trials: a 95% interval covers 0.95 +- 0.013 (one binomial sd); rows as requests are far too narrow.
    assert 0.91 <= covered_requests / trials <= 0.99
    assert covered_rows / trials < 0.8
