"""Leave-one-attack-out: does a detector trained on some attack families catch an unseen one?

Each fold holds out one attack family, as ``LeaveOneGroupOut`` with ``groups=attack`` does, and
everything learned (head ranking, feature standardization, detector weights, threshold) comes from
the rest: a stratified part of it fits the heads, scaler and detector, the other part chooses the
threshold. The folds are the families that have malicious prompts. Every request (``group``) is
tested in exactly one fold and never trained on in that fold:

- A family with both labels (a benign request drawn as a FigStep image belongs to "figstep") is
  tested on all its prompts whose requests no other family renders, as ``LeaveOneGroupOut`` gives.
- A request that several families render (MM-SafetyBench's SD, typography and text forms of one
  question) is dealt, seeded, to one of those families' folds, so that each family is tested on a
  similar share of its requests; its other forms are removed from that fold's training (``removed``).
- Mixes of single-label sources (jailbreak benchmarks, all malicious; MM-Vet, all benign): the
  prompts of families with no malicious prompt form the benign pool, split once into fixed disjoint
  shares (whole requests, stratified by family), one for each fold whose family has no benign
  prompt of its own. Such a fold tests on its family's malicious prompts plus its share and trains
  on neither; the other shares train it. Without such folds the pool only ever trains.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sahs.data.splits import split_rows
from sahs.eval.intervals import Estimate, Part, repeated_mean_auroc
from sahs.eval.metrics import require_classes
from sahs.experiments.heads import HeadDetector, fit_head_detector
from sahs.data.rankings import RankingStore
from sahs.experiments.settings import LoaoSettings


@dataclass
class Fold:
    """The rows of one leave-one-attack-out fold."""

    attack: str
    train_rows: torch.Tensor
    test_rows: torch.Tensor
    removed: int  # training rows dropped because their request is tested in this fold
    benign_share: int = 0  # test rows lent by the benign-only families (single-label mixes)


def _deal_shared_requests(request_rows: dict[int, np.ndarray], attacks: np.ndarray, labels: np.ndarray,
                          folds: list[str], seed: int) -> dict[int, str]:
    """Which fold tests each request rendered by several fold families: the candidate family that has the
    smallest share of its (label-wise) shared rows tested so far; requests in seeded random order."""
    shared = {g: rows for g, rows in request_rows.items() if len(set(attacks[rows]) & set(folds)) > 1}
    available: dict[tuple[str, int], int] = {}
    for rows in shared.values():
        for family, label in zip(attacks[rows], labels[rows]):
            available[family, label] = available.get((family, label), 0) + 1
    dealt: dict[tuple[str, int], int] = {}
    tester = {}
    for g in np.random.default_rng(seed).permutation(sorted(shared)):
        rows = shared[int(g)]
        best, best_load = None, np.inf
        for family in sorted(set(attacks[rows]) & set(folds)):
            counts = {int(y): int(n) for y, n in zip(*np.unique(labels[rows][attacks[rows] == family],
                                                                 return_counts=True))}
            load = sum(n * dealt.get((family, y), 0) / available[family, y] for y, n in counts.items())
            load /= sum(counts.values())
            if load < best_load:
                best, best_load = family, load
        tester[int(g)] = best
        for family, label in zip(attacks[rows], labels[rows]):
            if family == best:
                dealt[family, label] = dealt.get((family, label), 0) + 1
    return tester


def loao_folds(labels: torch.Tensor, attacks: np.ndarray, groups: np.ndarray | None = None,
               seed: int = 0) -> list[Fold]:
    """One fold per attack family with malicious prompts (``np.unique`` order); see the module docstring.

    Every fold is checked for both classes on both sides before any is fitted.
    """
    y = torch.as_tensor(labels).cpu().numpy()
    attacks = np.asarray(attacks, dtype=str)
    requests = np.arange(len(y)).astype(str) if groups is None else np.asarray(groups, dtype=str)
    request_ids = np.unique(requests, return_inverse=True)[1].reshape(-1)
    families = [str(f) for f in np.unique(attacks)]
    folds = [f for f in families if (y[attacks == f] == 1).any()]
    pooled = ~np.isin(attacks, folds)  # rows of the benign-only families
    borrowers = [f for f in folds if not (y[attacks == f] == 0).any()]
    tester = _testing_fold(y, attacks, request_ids, folds, pooled, borrowers, seed)
    result = []
    for family in folds:
        tested, own = tester == family, attacks == family
        lent = pooled & tested if family in borrowers else np.zeros_like(pooled)
        test_rows, train_rows = np.flatnonzero((own | lent) & tested), np.flatnonzero(~own & ~tested)
        _check_fold(family, y, test_rows, train_rows, family in borrowers, int(lent.sum()), bool(pooled.any()))
        result.append(Fold(family, torch.as_tensor(train_rows), torch.as_tensor(test_rows),
                           removed=int((~own & tested & ~lent).sum()), benign_share=int(lent.sum())))
    return result


def _testing_fold(labels: np.ndarray, attacks: np.ndarray, request_ids: np.ndarray, folds: list[str],
                  pooled: np.ndarray, borrowers: list[str], seed: int) -> np.ndarray:
    """The fold that tests each row's request (``""`` for none): the family rendering it, one of several
    dealt by ``_deal_shared_requests``, or, for requests only in the benign pool, the borrowing fold whose
    share (``split_rows``: whole requests, stratified by family) it fell in."""
    grouped: dict[int, list[int]] = {}
    for row, request in enumerate(request_ids.tolist()):
        grouped.setdefault(request, []).append(row)
    request_rows = {request: np.asarray(rows) for request, rows in grouped.items()}
    tester = {g: str(attacks[rows][~pooled[rows]][0]) for g, rows in request_rows.items() if (~pooled[rows]).any()}
    tester.update(_deal_shared_requests(request_rows, attacks, labels, folds, seed))
    pool_only = np.flatnonzero(pooled & ~np.isin(request_ids, list(tester)))
    if borrowers and len(pool_only):
        k = len(borrowers)
        shares = split_rows(labels[pool_only], [1 / k] * (k - 1), seed, attacks=attacks[pool_only],
                            groups=request_ids[pool_only], part="the benign-only families' prompts")
        for borrower, share in zip(borrowers, shares):
            tester.update({int(g): borrower for g in request_ids[pool_only[share.numpy()]]})
    return np.array([tester.get(int(g), "") for g in request_ids], dtype=object)


def _check_fold(family: str, labels: np.ndarray, test_rows: np.ndarray, train_rows: np.ndarray, borrows: bool,
                lent: int, has_pool: bool) -> None:
    """Both classes on both sides of a fold, or an error that says which part lacks what and how to fix it."""
    if borrows and not lent:
        reason = ("its benign share is empty: the benign-only families hold fewer requests than there are folds"
                  if has_pool else "no family of the mix has only benign prompts to lend it a share")
        raise ValueError(f"fold {family!r}: the held-out family has no benign prompts, and {reason}; add a benign "
                         "source (e.g. MM-Vet, XSTest-safe or VLGuard-safe) to the prompt mix")
    require_classes(torch.as_tensor(labels[test_rows]),
                    f"fold {family!r}: the held-out family" + (" with its benign share" if borrows else ""))
    require_classes(torch.as_tensor(labels[train_rows]), f"fold {family!r}: the training families")


@dataclass
class FoldResult:
    """One held-out family: its test metrics and what the other families' fit chose.

    With repeats, ``metrics`` are means over repeats and the rest (heads, threshold, model, counts,
    ``rows``/``scores``) is the first repeat's; ``n_iter`` is the largest and ``converged`` holds for all.
    """

    attack: str
    n_train: int
    n_test: int
    metrics: dict[str, float]  # auroc, auprc, acc@thr, fpr95, asr, pr, num_heads (+ active_heads)
    heads: list[tuple[int, int]]  # model (layer, head), best first
    threshold: float
    n_removed: int = 0  # training rows dropped as other forms of the requests this fold tests
    n_benign_share: int = 0  # benign test rows lent by the benign-only families (single-label mixes)
    model: HeadDetector | None = field(default=None, repr=False)
    n_iter: int | None = None  # iterations of the detector's full-batch fit
    converged: bool | None = None  # False: the fit stopped at max_iter (None: the detector does not say)
    auroc_ci: Estimate | None = None  # the AUROC's request-bootstrap interval
    rows: np.ndarray | None = field(default=None, repr=False)  # [n_test] tested row indices
    scores: np.ndarray | None = field(default=None, repr=False)  # [n_test] detector scores of those rows

    def part(self, labels: np.ndarray, groups: np.ndarray) -> Part:
        """The fold's scored test rows, for the intervals."""
        return Part.of(self.scores, labels[self.rows], groups[self.rows])

    def record(self) -> dict:
        """The fold as ``loao.json`` and ``loao.csv`` hold it."""
        ci = self.auroc_ci or Estimate(self.metrics["auroc"])
        return dict(attack=self.attack, n_train=self.n_train, n_test=self.n_test, n_removed=self.n_removed,
                    n_benign_share=self.n_benign_share, threshold=self.threshold, heads=self.heads,
                    **self.metrics, auroc_ci_low=ci.low, auroc_ci_high=ci.high, n_iter=self.n_iter,
                    converged=self.converged)


@dataclass
class LoaoResult:
    """All folds of a leave-one-attack-out run (with repeats: the folds' means, and every repeat's own)."""

    folds: list[FoldResult]
    auroc_interval: Estimate | None = None  # of auroc_mean
    repeats: list[list[FoldResult]] = field(default_factory=list)  # every repeat's folds, first repeat first
    ids: np.ndarray | None = field(default=None, repr=False)  # [prompts] prompt ids, for scores.csv
    groups: np.ndarray | None = field(default=None, repr=False)  # [prompts] request ids
    labels: np.ndarray | None = field(default=None, repr=False)  # [prompts]

    @property
    def auroc_mean(self) -> float:
        return float(np.mean([fold.metrics["auroc"] for fold in self.folds]))

    @property
    def auroc_min(self) -> float:
        return float(min(fold.metrics["auroc"] for fold in self.folds))

    @property
    def auroc_mean_std(self) -> float | None:
        """Standard deviation (ddof 1) of ``auroc_mean`` across repeats; None for one run."""
        if len(self.repeats) < 2:
            return None
        return float(np.std([np.mean([f.metrics["auroc"] for f in folds]) for folds in self.repeats], ddof=1))

    @property
    def folds_not_converged(self) -> int:
        """Folds (of every repeat) whose detector fit stopped at max_iter."""
        return sum(fold.converged is False for folds in (self.repeats or [self.folds]) for fold in folds)

    def summary(self, prefix: str = "loao") -> dict[str, float]:
        """Flat ``stage/name`` metrics: means over folds with the AUROC's interval, ``auroc_min``, every
        fold's own numbers, the count of folds that hit max_iter and (repeats) ``auroc_mean_std``."""
        mean = self.auroc_interval or Estimate(self.auroc_mean)
        out = {**mean.as_dict(f"{prefix}/auroc_mean"), f"{prefix}/auroc_min": self.auroc_min}
        if self.auroc_mean_std is not None:
            out[f"{prefix}/auroc_mean_std"] = self.auroc_mean_std
        for name in self.folds[0].metrics:
            if name != "auroc":
                out[f"{prefix}/{name}_mean"] = float(np.mean([fold.metrics[name] for fold in self.folds]))
        for fold in self.folds:
            out.update({f"{prefix}/{fold.attack}/{name}": value for name, value in fold.metrics.items()})
            if fold.auroc_ci is not None:
                out.update({f"{prefix}/{fold.attack}/auroc_ci_{end}": getattr(fold.auroc_ci, end)
                            for end in ("low", "high")})
        out[f"{prefix}/folds_not_converged"] = self.folds_not_converged
        return {name: value for name, value in out.items() if value is not None}

    def save(self, directory: str | Path) -> Path:
        """Write ``loao.json`` (summary and folds), ``loao.csv`` (one row per fold) and ``scores.csv``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        folds = [fold.record() for fold in self.folds]
        mean = self.auroc_interval or Estimate(self.auroc_mean)
        payload = {"auroc_mean": self.auroc_mean, "auroc_mean_ci_low": mean.low, "auroc_mean_ci_high": mean.high,
                   "level": mean.level, "auroc_min": self.auroc_min, "folds_not_converged": self.folds_not_converged}
        if self.auroc_mean_std is not None:
            payload.update(auroc_mean_std=self.auroc_mean_std, repeats=[
                {"auroc_mean": float(np.mean([f.metrics["auroc"] for f in run])), "folds": [f.record() for f in run]}
                for run in self.repeats])
        payload["folds"] = folds
        (directory / "loao.json").write_text(json.dumps(payload, indent=1))
        with open(directory / "loao.csv", "w", newline="") as handle:
            columns = ["attack", "n_train", "n_test", "n_removed", "n_benign_share", "threshold",
                       *self.folds[0].metrics, "auroc_ci_low", "auroc_ci_high", "n_iter", "converged"]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(folds)
        if all(fold.scores is not None for fold in self.folds) and self.labels is not None:
            self._save_scores(directory / SCORES_FILE)
        return directory / "loao.json"

    def _save_scores(self, path: Path) -> None:
        """One line per (fold, test row): what paired comparisons between runs read."""
        runs = self.repeats if len(self.repeats) > 1 else [self.folds]
        n = len(self.labels)
        ids = self.ids if self.ids is not None else np.arange(n).astype(str)
        groups = self.groups if self.groups is not None else np.arange(n).astype(str)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(SCORES_COLUMNS + (["repeat"] if len(runs) > 1 else []))
            for repeat, folds in enumerate(runs):
                for fold in folds:
                    for row, score in zip(fold.rows.tolist(), fold.scores.tolist()):
                        line = [fold.attack, row, ids[row], groups[row], int(self.labels[row]), repr(score)]
                        writer.writerow(line + ([repeat] if len(runs) > 1 else []))


SCORES_FILE = "scores.csv"
SCORES_COLUMNS = ["fold", "row", "id", "group", "label", "score"]


def _as_columns(features, labels, attacks, groups):
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    attacks = np.asarray(attacks, dtype=str)
    groups = None if groups is None else np.asarray(groups, dtype=str)
    if attacks.shape != (len(labels),) or features.shape[0] != len(labels) or (
            groups is not None and groups.shape != (len(labels),)):
        sizes = f"{features.shape[0]}, {len(labels)}, {attacks.shape}, {None if groups is None else groups.shape}"
        raise ValueError(f"features, labels, attacks and groups disagree on the number of prompts: {sizes}")
    return features, labels, attacks, groups


def leave_one_attack_out(
    features: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str] | np.ndarray,
    settings: LoaoSettings = LoaoSettings(),
    *,
    layers: Sequence[int] | None = None,
    groups: Sequence | np.ndarray | None = None,
    ids: Sequence | np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    rankings: RankingStore | None = None,
) -> LoaoResult:
    """One fold per attack family; see the module docstring for what each fold may see.

    Every AUROC gets a request-bootstrap interval (``settings.n_boot``, ``settings.level``: requests
    resampled within each fold, ``sahs.eval.intervals``). ``settings.repeats`` runs the protocol with
    seeds ``seed, seed + 1, ...`` (splits, dealing, ranking, initialization) and reports the means.

    Args:
        features: ``[n, layers, heads, head_dim]`` activations at the first generated token.
        labels: ``[n]``, 0 benign and 1 malicious.
        attacks: Attack family of each prompt (benign prompts included): the families with malicious
            prompts are the folds; the others are the benign pool.
        settings: What each fold fits and how (heads, detector, threshold, seed; the seed also deals
            shared requests and the benign pool's shares to folds), and the intervals and repeats.
        layers: Model layer number of each entry of the features' layer axis (``0..L-1`` when None).
        groups: Request id of each prompt; a request tested in a fold never reaches its training, and the
            intervals resample whole requests.
        ids: Prompt id of each prompt, for ``scores.csv`` (row numbers when None).
        progress: Called with a line such as ``"fold 2/5 'typo'"`` before each fold is fitted.
        rankings: Where each fold's head ranking is looked up and kept (``RankingStore``), so that
            runs differing only in top_k, detector or its regularization fit detectors only.
    """
    features, labels, attacks, groups = _as_columns(features, labels, attacks, groups)
    requests = np.arange(len(labels)).astype(str) if groups is None else groups
    runs = []
    for repeat in range(settings.repeats):
        say = progress if progress is None or settings.repeats == 1 else (
            lambda line, r=repeat: progress(f"repeat {r + 1}/{settings.repeats} {line}"))
        runs.append(_run_folds(features, labels, attacks, groups, settings.with_(seed=settings.seed + repeat),
                               layers, say, rankings))
    y = labels.numpy()
    parts = [[fold.part(y, requests) for fold in folds] for folds in runs]
    mean, per_fold = repeated_mean_auroc(parts, settings.n_boot, settings.seed, settings.level)
    folds = runs[0] if len(runs) == 1 else [_mean_over_repeats([run[i] for run in runs]) for i in range(len(runs[0]))]
    for fold, interval in zip(folds, per_fold):
        fold.auroc_ci = interval
    return LoaoResult(folds, mean, runs if len(runs) > 1 else [], None if ids is None else np.asarray(ids, dtype=str),
                      requests, y)


def _mean_over_repeats(folds: list[FoldResult]) -> FoldResult:
    """One family's fold over repeats: metrics averaged, the rest from the first repeat (see FoldResult)."""
    first = folds[0]
    metrics = {name: float(np.mean([fold.metrics[name] for fold in folds])) for name in first.metrics}
    iterations = [fold.n_iter for fold in folds if fold.n_iter is not None]
    converged = None if any(fold.converged is None for fold in folds) else all(fold.converged for fold in folds)
    return replace(first, metrics=metrics, n_iter=max(iterations) if iterations else None, converged=converged)


def _run_folds(features, labels, attacks, groups, settings: LoaoSettings, layers, progress, rankings) -> list[FoldResult]:
    """The protocol once, at ``settings.seed``: every fold fitted and scored."""
    folds = loao_folds(labels, attacks, groups, seed=settings.seed)
    results = []
    for index, fold in enumerate(folds, start=1):
        if progress is not None:
            progress(f"fold {index}/{len(folds)} {fold.attack!r}")
        # Folds pass row indices: the features are read in place, never copied per fold.
        fitted = fit_head_detector(
            features, labels, settings, rows=fold.train_rows, layers=layers, attacks=attacks, groups=groups,
            name=f"fold {fold.attack!r}: the training families", rank=None if rankings is None else rankings.rank)
        scores = fitted.decision_function(features, fold.test_rows)
        metrics = fitted.evaluate(features, labels, part=f"fold {fold.attack!r}: the held-out prompts",
                                  rows=fold.test_rows, scores=scores)
        n_iter = getattr(fitted.detector, "n_iter_", None)
        converged = getattr(fitted.detector, "converged_", None)
        results.append(FoldResult(fold.attack, len(fold.train_rows), len(fold.test_rows), metrics, fitted.heads,
                                  fitted.threshold, fold.removed, fold.benign_share, fitted,
                                  None if n_iter is None else int(n_iter), None if converged is None else bool(converged),
                                  rows=fold.test_rows.numpy(), scores=scores.detach().cpu().double().numpy()))
    return results


@dataclass(frozen=True)
class ScoredFolds:
    """A run's ``scores.csv``: its (repeat, fold) parts in file order, each with its row numbers."""

    keys: list[tuple[int, str]]
    rows: list[np.ndarray]
    parts: list[Part]

    def same_rows(self, other: ScoredFolds) -> bool:
        """Whether ``other`` scored exactly these rows, fold by fold (what a paired comparison needs)."""
        return self.layout() == other.layout()

    def layout(self) -> str:
        """A digest of the folds, rows, labels and requests (not the scores): equal for runs that can be paired."""
        digest = hashlib.sha1()
        for key, rows, part in zip(self.keys, self.rows, self.parts):
            digest.update(repr(key).encode())
            for array in (rows.astype(np.int64), part.labels, np.char.encode(part.groups)):
                digest.update(np.ascontiguousarray(array).tobytes() + b"|")
        return digest.hexdigest()


def load_scores(path: str | Path) -> ScoredFolds:
    """Read a run's ``scores.csv`` (``SCORES_COLUMNS``, and ``repeat`` when the run repeated the protocol)."""
    with open(path, newline="") as handle:
        lines = list(csv.DictReader(handle))
    if not lines or any(name not in lines[0] for name in SCORES_COLUMNS):
        raise ValueError(f"{path} is not a LOAO scores file: it needs the columns {', '.join(SCORES_COLUMNS)}")
    grouped: dict[tuple[int, str], list[dict]] = {}
    for line in lines:
        grouped.setdefault((int(line.get("repeat") or 0), line["fold"]), []).append(line)
    keys = list(grouped)
    rows = [np.array([int(line["row"]) for line in grouped[key]]) for key in keys]
    parts = [Part.of([float(line["score"]) for line in grouped[key]], [int(line["label"]) for line in grouped[key]],
                     [line["group"] for line in grouped[key]]) for key in keys]
    return ScoredFolds(keys, rows, parts)
