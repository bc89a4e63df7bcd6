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
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sahs.data.splits import split_rows
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
    """One held-out family: its test metrics and what the other families' fit chose."""

    attack: str
    n_train: int
    n_test: int
    metrics: dict[str, float]  # auroc, auprc, acc@thr, fpr95, asr, pr, num_heads (+ active_heads)
    heads: list[tuple[int, int]]  # model (layer, head), best first
    threshold: float
    n_removed: int = 0  # training rows dropped as other forms of the requests this fold tests
    n_benign_share: int = 0  # benign test rows lent by the benign-only families (single-label mixes)
    model: HeadDetector | None = field(default=None, repr=False)


@dataclass
class LoaoResult:
    """All folds of a leave-one-attack-out run."""

    folds: list[FoldResult]

    @property
    def auroc_mean(self) -> float:
        return float(np.mean([fold.metrics["auroc"] for fold in self.folds]))

    @property
    def auroc_min(self) -> float:
        return float(min(fold.metrics["auroc"] for fold in self.folds))

    def summary(self, prefix: str = "loao") -> dict[str, float]:
        """Flat ``stage/name`` metrics: means over folds, ``auroc_min`` and every fold's own numbers."""
        out = {f"{prefix}/auroc_mean": self.auroc_mean, f"{prefix}/auroc_min": self.auroc_min}
        for name in self.folds[0].metrics:
            if name != "auroc":
                out[f"{prefix}/{name}_mean"] = float(np.mean([fold.metrics[name] for fold in self.folds]))
        for fold in self.folds:
            out.update({f"{prefix}/{fold.attack}/{name}": value for name, value in fold.metrics.items()})
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``loao.json`` (summary and folds) and ``loao.csv`` (one row per fold)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        folds = [
            dict(attack=f.attack, n_train=f.n_train, n_test=f.n_test, n_removed=f.n_removed,
                 n_benign_share=f.n_benign_share, threshold=f.threshold, heads=f.heads, **f.metrics)
            for f in self.folds
        ]
        payload = {"auroc_mean": self.auroc_mean, "auroc_min": self.auroc_min, "folds": folds}
        (directory / "loao.json").write_text(json.dumps(payload, indent=1))
        with open(directory / "loao.csv", "w", newline="") as handle:
            columns = ["attack", "n_train", "n_test", "n_removed", "n_benign_share", "threshold",
                       *self.folds[0].metrics]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(folds)
        return directory / "loao.json"


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
    progress: Callable[[str], None] | None = None,
    rankings: RankingStore | None = None,
) -> LoaoResult:
    """One fold per attack family; see the module docstring for what each fold may see.

    Args:
        features: ``[n, layers, heads, head_dim]`` activations at the first generated token.
        labels: ``[n]``, 0 benign and 1 malicious.
        attacks: Attack family of each prompt (benign prompts included): the families with malicious
            prompts are the folds; the others are the benign pool.
        settings: What each fold fits and how (heads, detector, threshold, seed; the seed also deals
            shared requests and the benign pool's shares to folds).
        layers: Model layer number of each entry of the features' layer axis (``0..L-1`` when None).
        groups: Request id of each prompt; a request tested in a fold never reaches its training.
        progress: Called with a line such as ``"fold 2/5 'typo'"`` before each fold is fitted.
        rankings: Where each fold's head ranking is looked up and kept (``RankingStore``), so that
            runs differing only in top_k, detector or its regularization fit detectors only.
    """
    features, labels, attacks, groups = _as_columns(features, labels, attacks, groups)
    folds = loao_folds(labels, attacks, groups, seed=settings.seed)
    results = []
    for index, fold in enumerate(folds, start=1):
        if progress is not None:
            progress(f"fold {index}/{len(folds)} {fold.attack!r}")
        # Folds pass row indices: the features are read in place, never copied per fold.
        fitted = fit_head_detector(
            features, labels, settings, rows=fold.train_rows, layers=layers, attacks=attacks, groups=groups,
            name=f"fold {fold.attack!r}: the training families", rank=None if rankings is None else rankings.rank)
        metrics = fitted.evaluate(features, labels, part=f"fold {fold.attack!r}: the held-out prompts",
                                  rows=fold.test_rows)
        results.append(FoldResult(fold.attack, len(fold.train_rows), len(fold.test_rows), metrics, fitted.heads,
                                  fitted.threshold, fold.removed, fold.benign_share, fitted))
    return LoaoResult(results)
