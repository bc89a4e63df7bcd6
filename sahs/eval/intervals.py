"""Bootstrap intervals by request group: AUROC of one fold, the mean over folds, paired differences; group means.

Rows of one request (``group``: a question and its renderings) are not independent, so the bootstrap
resamples whole requests, never rows. Each replicate draws, within each stratum (a fold and the class of
its requests), as many requests as the stratum holds, with replacement; a request drawn ``c`` times
weighs ``c`` in every row it has. Strata keep every replicate's class balance and fold sizes fixed, so
no replicate lacks a class. The AUROC of a replicate is the weighted Mann-Whitney statistic, computed for
all replicates at once (``weighted_auroc``). Intervals are percentile intervals of the replicates.

Draw order (what makes a seed reproducible): ``numpy.random.default_rng(seed)``; strata in sorted
``(part, class)`` order, requests of a stratum in sorted order; per stratum one
``rng.integers(0, m, size=(n_boot, m), dtype=draw_dtype(m))`` of drawn request positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class Estimate:
    """A figure with its two-sided interval at ``level`` (``low``/``high`` None when not computed)."""

    value: float
    low: float | None = None
    high: float | None = None
    level: float = 0.95

    def as_dict(self, name: str) -> dict[str, float | None]:
        """``{name: value, name_ci_low: low, name_ci_high: high}``: the flat names of logs, JSON and tables."""
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the interval (closed)."""
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    def text(self, digits: int = 4) -> str:
        """``0.9123 [0.8950, 0.9301]``."""
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Part:
    """The scored test rows of one fold: ``scores``, 0/1 ``labels`` and request ``groups``, all ``[n]``."""

    scores: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    @staticmethod
    def of(scores, labels, groups=None) -> Part:
        """A checked part; ``groups`` None makes every row a request of its own, named by its position
        (parts resampled together must name their requests apart: a shared name is one request)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        groups = np.arange(len(scores)).astype(str) if groups is None else np.asarray(groups, dtype=str).reshape(-1)
        if not (len(scores) == len(labels) == len(groups)):
            raise ValueError(f"scores, labels and groups differ in length: {len(scores)}, {len(labels)}, {len(groups)}")
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        if not (np.isin(labels, (0, 1)).all() and (labels == 0).any() and (labels == 1).any()):
            raise ValueError("an AUROC interval needs 0/1 labels with both classes present")
        return Part(scores, labels, groups)


@dataclass(frozen=True)
class Resample:
    """Bootstrap counts: ``counts[j, b]`` is how often request ``keys[j]`` is drawn in replicate ``b``."""

    keys: np.ndarray  # [G] request ids, sorted
    position: np.ndarray  # [G] row of each key in ``counts`` (rows run stratum by stratum)
    counts: np.ndarray  # [G, n_boot]: a request's counts are contiguous, so a part gathers whole rows

    @property
    def n_boot(self) -> int:
        return self.counts.shape[1]

    def rows_of(self, groups: np.ndarray) -> np.ndarray:
        """The row of ``counts`` of each of ``groups`` (every one must have been drawn)."""
        found = np.minimum(np.searchsorted(self.keys, groups), len(self.keys) - 1)
        if not (self.keys[found] == groups).all():
            raise ValueError("a part holds requests that the resample did not draw")
        return self.position[found]


def draw_requests(parts: Sequence[Part], n_boot: int = 1000, seed: int = 0) -> Resample:
    """Stratified request bootstrap over ``parts`` (stratum: part index and the request's class).

    A request in several parts is stratified by the first; its class is its largest label there. Draw
    order: strata in sorted ``(part, class)`` order, each with one ``rng.integers(0, m, size=(n_boot, m),
    dtype=draw_dtype(m))`` of positions among its ``m`` requests (sorted).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    groups = np.concatenate([part.groups for part in parts])
    labels = np.concatenate([part.labels for part in parts])
    part_of = np.repeat(np.arange(len(parts)), [len(part.groups) for part in parts])
    keys, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    home = part_of[first]  # [G] the first part holding each request
    in_home = part_of == home[inverse]
    classes = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(classes, inverse[in_home], labels[in_home])
    order = np.lexsort((np.arange(len(keys)), classes, home))  # stratum by stratum, sorted within
    position = np.empty(len(keys), dtype=np.int64)
    position[order] = np.arange(len(keys))
    strata = home[order] * 2 + classes[order]
    sizes = np.diff(np.flatnonzero(np.r_[True, strata[1:] != strata[:-1], True]))  # [strata], in order
    rng = np.random.default_rng(seed)
    counts = np.empty((len(keys), n_boot))  # [G, B], rows in stratum order
    start = 0
    for m in sizes.tolist():  # per stratum: its counts fit in cache, so the bincount is cheap
        drawn = rng.integers(0, m, size=(n_boot, m), dtype=draw_dtype(m)).astype(np.int64)  # [B, m]
        drawn += m * np.arange(n_boot)[:, None]
        counts[start:start + m] = np.bincount(drawn.reshape(-1), minlength=n_boot * m).reshape(n_boot, m).T
        start += m
    return Resample(keys, position, counts)


def draw_dtype(m: int) -> type:
    """The integer type positions among ``m`` requests are drawn in: 16 bits when they fit (faster)."""
    return np.uint16 if m < 2**16 else np.int64


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                   method: str | None = None) -> np.ndarray:
    """AUROC under each column of ``weights [n, B]`` (ties count one half); NaN where a class weighs nothing.

    Per replicate, the sum over positive rows of their weight times the negative weight below them
    (half of it at equal scores), for all replicates at once: ``"matrix"`` as one product of the
    ``[positives, negatives]`` comparison matrix with the negative weights (BLAS; small folds), or
    ``"cumsum"`` as a cumulative sum of the sorted negative weights read at each positive score (large
    folds). ``None`` picks the cheaper. Both are exact: weights are counts, comparisons 0, 1/2 or 1.
    """
    positive = labels.astype(bool)
    s_pos, s_neg = scores[positive], scores[~positive]
    w_pos, w_neg = weights[positive], weights[~positive]  # [n_pos, B], [n_neg, B]
    if method is None:
        method = "matrix" if len(s_pos) * len(s_neg) <= MATRIX_LIMIT * len(scores) else "cumsum"
    if method == "matrix":
        compare = (s_neg[None, :] < s_pos[:, None]).astype(weights.dtype)
        compare += 0.5 * (s_neg[None, :] == s_pos[:, None])
        below = compare @ w_neg  # [n_pos, B]
    else:
        order = np.argsort(s_neg, kind="stable")
        s_neg, w_neg = s_neg[order], w_neg[order]
        cumulative = np.zeros((len(s_neg) + 1, weights.shape[1]), dtype=weights.dtype)
        np.cumsum(w_neg, axis=0, out=cumulative[1:])  # row k: the weight of the k lowest negatives
        less = np.searchsorted(s_neg, s_pos, side="left")
        equal_or_less = np.searchsorted(s_neg, s_pos, side="right")
        below = cumulative[less]
        if (equal_or_less != less).any():  # ties: half of the negatives at the same score
            below += 0.5 * (cumulative[equal_or_less] - below)
    wins = np.einsum("ib,ib->b", w_pos, below)
    total = w_pos.sum(axis=0) * w_neg.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


MATRIX_LIMIT = 256  # the matrix while positives x negatives <= 256 x rows: about 1,000 balanced rows (measured)


def replicates(parts: Sequence[Part], resample: Resample) -> np.ndarray:
    """``[B, len(parts)]``: every part's AUROC under every replicate of ``resample``."""
    out = np.empty((resample.n_boot, len(parts)))
    for index, part in enumerate(parts):
        out[:, index] = weighted_auroc(part.scores, part.labels, resample.counts[resample.rows_of(part.groups)])
    return out


def percentile_interval(value: float, draws: np.ndarray, level: float = 0.95) -> Estimate:
    """``value`` with the percentile interval of its bootstrap ``draws`` (NaN draws left out)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    low, high = (np.nanpercentile if np.isnan(draws).any() else np.percentile)(draws, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high), level)


def plain_auroc(part: Part) -> float:
    """The unweighted AUROC of a part (every weight one)."""
    return float(weighted_auroc(part.scores, part.labels, np.ones((len(part.scores), 1)))[0])


def bootstrap_auroc(scores, labels, groups=None, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> Estimate:
    """AUROC of one fold's scores with its request-bootstrap interval (``groups`` None: rows are requests)."""
    part = Part.of(scores, labels, groups)
    draws = replicates([part], draw_requests([part], n_boot, seed))[:, 0]
    return percentile_interval(plain_auroc(part), draws, level)


def bootstrap_mean_auroc(folds: Sequence[Part], n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[Estimate, list[Estimate]]:
    """The mean AUROC over folds and each fold's, with intervals; each fold's requests are resampled
    within it (independent strata), and a replicate's mean averages the folds' AUROCs of that replicate."""
    return repeated_mean_auroc([folds], n_boot, seed, level)


def repeated_mean_auroc(repeats: Sequence[Sequence[Part]], n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[Estimate, list[Estimate]]:
    """The mean over repeats of the mean AUROC over folds, and each fold's mean over repeats, with intervals.

    ``repeats[r][i]`` is fold ``i`` in repeat ``r`` (the same family under another split). The repeats
    test the same requests: one resample (stratified by the first repeat's folds) weighs a request alike
    in every repeat, so their shared data are not counted as independent evidence.
    """
    resample = draw_requests(repeats[0], n_boot, seed)
    draws = np.mean([replicates(parts, resample) for parts in repeats], axis=0)  # [B, folds]
    values = np.mean([[plain_auroc(part) for part in parts] for parts in repeats], axis=0)  # [folds]
    per_fold = [percentile_interval(v, draws[:, i], level) for i, v in enumerate(values)]
    return percentile_interval(values.mean(), draws.mean(axis=1), level), per_fold


def paired_difference(a: Sequence[Part], b: Sequence[Part], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """Mean-over-folds AUROC of ``a`` minus that of ``b`` on the same test rows, with a paired interval.

    ``a[i]`` and ``b[i]`` must hold the same rows (labels and groups) in the same order: each replicate
    weighs a request alike in both, so what the two share (the hard and easy requests) cancels. The
    resample is drawn from ``b``'s layout (the same as ``a``'s).
    """
    if len(a) != len(b):
        raise ValueError(f"paired parts differ in number: {len(a)} and {len(b)}")
    return paired_differences(b, [a], n_boot, seed, level)[0]


def paired_differences(reference: Sequence[Part], others: Sequence[Sequence[Part]], n_boot: int = 1000,
                       seed: int = 0, level: float = 0.95) -> list[Estimate]:
    """``paired_difference(other, reference)`` for each of ``others``, all under one resample of the
    reference's requests (one draw, one pass over the reference's replicates)."""
    resample = draw_requests(reference, n_boot, seed)
    base = replicates(reference, resample).mean(axis=1)
    base_value = np.mean([plain_auroc(part) for part in reference])
    out = []
    for parts in others:
        if len(parts) != len(reference) or not all(
                np.array_equal(x.groups, y.groups) and np.array_equal(x.labels, y.labels)
                for x, y in zip(parts, reference)):
            raise ValueError("paired parts must hold the same rows (groups and labels) in the same order")
        draws = replicates(parts, resample).mean(axis=1) - base
        out.append(percentile_interval(np.mean([plain_auroc(part) for part in parts]) - base_value, draws, level))
    return out


def bootstrap_means(values: np.ndarray, groups, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of ``values [n, k]`` over rows and percentile intervals, resampling whole groups with replacement.

    Each replicate draws as many groups as there are, ``rng.integers(0, G, (n_boot, G))`` with
    ``numpy.random.default_rng(seed)``, groups in sorted order; a group drawn ``c`` times weighs ``c``.
    """
    values = np.asarray(values, dtype=np.float64)
    keys, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sums = np.zeros((len(keys), values.shape[1]))
    np.add.at(sums, index, values)
    sizes = np.bincount(index, minlength=len(keys)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    counts = np.zeros((n_boot, len(keys)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(keys)), draws.ravel()), 1.0)
    means = (counts @ sums) / (counts @ sizes)[:, None]  # [n_boot, k]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return values.mean(axis=0), low, high


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])
