"""Leave-one-attack-out: does a detector trained on some attack families catch an unseen one?

Each fold holds out one attack family: all of its prompts, benign and malicious (a benign request
rendered as a FigStep image belongs to the "figstep" family), as ``LeaveOneGroupOut`` with
``groups=attack`` gives them. Everything learned (head ranking, feature standardization, detector
weights, threshold) comes from the other families: a stratified part of them fits the heads, scaler
and detector, the rest chooses the threshold. The held-out family is only scored. When prompts carry
request groups, the held-out family's requests are also removed from the training rows (the same
question rendered by another family would otherwise leak the answer).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import LeaveOneGroupOut

from sahs.eval.metrics import require_classes
from sahs.experiments.heads import HeadDetector, fit_head_detector
from sahs.experiments.rankings import RankingStore
from sahs.experiments.settings import LoaoSettings


@dataclass
class Fold:
    """The rows of one leave-one-attack-out fold."""

    attack: str
    train_rows: torch.Tensor
    test_rows: torch.Tensor
    removed: int  # training rows dropped because their request is also in the held-out family


def loao_folds(labels: torch.Tensor, attacks: np.ndarray, groups: np.ndarray | None = None) -> list[Fold]:
    """One fold per attack family (``np.unique`` order), every fold checked before any is fitted."""
    splits = LeaveOneGroupOut().split(np.zeros(len(labels)), labels.numpy(), groups=attacks)
    folds = []
    for train_rows, test_rows in splits:
        family = str(attacks[test_rows[0]])
        removed = 0
        if groups is not None:
            leaked = np.isin(groups[train_rows], groups[test_rows])
            removed, train_rows = int(leaked.sum()), train_rows[~leaked]
        require_classes(labels[test_rows], f"fold {family!r}: the held-out family")
        require_classes(labels[train_rows], f"fold {family!r}: the training families")
        folds.append(Fold(family, torch.as_tensor(train_rows), torch.as_tensor(test_rows), removed))
    return folds


@dataclass
class FoldResult:
    """One held-out family: its test metrics and what the other families' fit chose."""

    attack: str
    n_train: int
    n_test: int
    metrics: dict[str, float]  # auroc, auprc, acc@thr, fpr95, asr, pr, num_heads (+ active_heads)
    heads: list[tuple[int, int]]  # model (layer, head), best first
    threshold: float
    n_removed: int = 0  # training rows dropped as requests shared with the held-out family
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
                 threshold=f.threshold, heads=f.heads, **f.metrics)
            for f in self.folds
        ]
        payload = {"auroc_mean": self.auroc_mean, "auroc_min": self.auroc_min, "folds": folds}
        (directory / "loao.json").write_text(json.dumps(payload, indent=1))
        with open(directory / "loao.csv", "w", newline="") as handle:
            columns = ["attack", "n_train", "n_test", "n_removed", "threshold", *self.folds[0].metrics]
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
        attacks: Attack family of each prompt (benign prompts included): the folds.
        settings: What each fold fits and how (heads, detector, threshold, seed).
        layers: Model layer number of each entry of the features' layer axis (``0..L-1`` when None).
        groups: Request id of each prompt; a held-out family's requests never reach its fold's training.
        progress: Called with a line such as ``"fold 2/5 'typo'"`` before each fold is fitted.
        rankings: Where each fold's head ranking is looked up and kept (``RankingStore``), so that
            runs differing only in top_k, detector or its regularization fit detectors only.
    """
    features, labels, attacks, groups = _as_columns(features, labels, attacks, groups)
    folds = loao_folds(labels, attacks, groups)
    results = []
    for index, fold in enumerate(folds, start=1):
        if progress is not None:
            progress(f"fold {index}/{len(folds)} {fold.attack!r}")
        # Folds pass row indices: the features are read in place, never copied per fold.
        fitted = fit_head_detector(
            features, labels, settings, rows=fold.train_rows, layers=layers, attacks=attacks, groups=groups,
            name=f"fold {fold.attack!r}: the training families", rank=None if rankings is None else rankings.rank)
        metrics = fitted.evaluate(features, labels, part=f"fold {fold.attack!r}: the held-out family",
                                  rows=fold.test_rows)
        results.append(FoldResult(fold.attack, len(fold.train_rows), len(fold.test_rows), metrics, fitted.heads,
                                  fitted.threshold, fold.removed, fitted))
    return LoaoResult(results)
