"""Leave-one-attack-out: does a detector trained on some attack families catch an unseen one?

Each fold holds out one attack family: all of its prompts, benign and malicious (a benign request
rendered as a FigStep image belongs to the "figstep" family), as ``LeaveOneGroupOut`` with
``groups=attack`` gives them. Everything learned (head ranking, feature standardization, detector
weights, threshold) comes from the other families: a stratified part of them fits the heads, scaler
and detector, the rest chooses the threshold. The held-out family is only scored.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.model_selection import LeaveOneGroupOut

from sahs.eval.heatmap import plot_heatmap
from sahs.eval.metrics import choose_threshold, detection_report, require_classes
from sahs.eval.probes import HeadRanking, rank_heads, stratified_split
from sahs.models.detectors import Detector, LogisticDetector

DetectorSpec = Detector | Callable[[], Detector]


def resolve_top_k(top_k: int | float, num_heads: int) -> int:
    """Number of heads: an int is a count, a float in (0, 1] a fraction of all heads (at least one)."""
    if isinstance(top_k, float):
        if not 0 < top_k <= 1:
            raise ValueError(f"a fractional top_k must be in (0, 1], got {top_k}")
        return max(1, round(top_k * num_heads))
    if not 1 <= top_k <= num_heads:
        raise ValueError(f"top_k must be in [1, {num_heads}], got {top_k}")
    return top_k


def _new_detector(detector: DetectorSpec) -> Detector:
    return detector.clone() if isinstance(detector, Detector) else detector()


@dataclass
class HeadDetector:
    """A detector on the top-k heads with the scaler and threshold learned alongside it."""

    heads: list[tuple[int, int]]  # (layer, head), best first
    mean: torch.Tensor  # [k * head_dim]
    std: torch.Tensor  # [k * head_dim]
    detector: Detector
    threshold: float
    ranking: HeadRanking

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Standardized detector inputs ``[n, k * head_dim]`` from ``[n, layers, heads, head_dim]``."""
        return (select_heads(features, self.heads) - self.mean) / self.std

    def decision_function(self, features: torch.Tensor) -> torch.Tensor:
        return self.detector.decision_function(self.inputs(features))


def select_heads(features: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Concatenate the chosen heads: ``[n, layers, heads, head_dim]`` -> ``[n, k * head_dim]`` in float32."""
    layers, heads_ = torch.tensor(heads).T
    return torch.as_tensor(features)[:, layers, heads_].flatten(1).float()


def fit_head_detector(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    top_k: int | float = 16,
    detector: DetectorSpec = LogisticDetector,
    val_fraction: float = 0.2,
    seed: int = 0,
    threshold_rule: Literal["tpr", "youden"] = "tpr",
    target_tpr: float = 0.95,
    probe_l2: float = 1e-2,
    max_iter: int = 1000,
    name: str = "training rows",
) -> HeadDetector:
    """Locate heads, standardize, fit the detector and choose its threshold, all on the rows given.

    A stratified ``val_fraction`` of the rows only chooses the threshold; the rest ranks the heads
    (``rank_heads``), gives the scaler's mean/std and fits the detector (full batch, ``fit``). The
    arguments are those of ``leave_one_attack_out``; ``name`` labels the rows in error messages.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    fit_rows, val_rows = stratified_split(labels, val_fraction, seed, part=name)
    ranking = rank_heads(features[fit_rows], labels[fit_rows], seed=seed, l2=probe_l2)
    heads = ranking.top(resolve_top_k(top_k, ranking.auroc.numel()))
    x_fit = select_heads(features[fit_rows], heads)  # [n_fit, k * head_dim]
    mean, std = x_fit.mean(dim=0), x_fit.std(dim=0, correction=0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(seed)
        model = _new_detector(detector).fit((x_fit - mean) / std, labels[fit_rows], max_iter=max_iter)
    val_scores = model.decision_function((select_heads(features[val_rows], heads) - mean) / std)
    val_part = f"{name} (validation)"
    threshold = choose_threshold(val_scores, labels[val_rows], threshold_rule, target_tpr, part=val_part)
    return HeadDetector(heads, mean, std, model, threshold, ranking)


def _evaluate(fitted: HeadDetector, features: torch.Tensor, labels: torch.Tensor, part: str) -> dict[str, float]:
    metrics = detection_report(fitted.decision_function(features), labels, fitted.threshold, part=part)
    metrics["num_heads"] = float(len(fitted.heads))
    if hasattr(fitted.detector, "active_heads") and getattr(fitted.detector, "head_dim", None):
        metrics["active_heads"] = float(fitted.detector.active_heads())
    return metrics


@dataclass
class FoldResult:
    """One held-out family: its test metrics and what the other families' fit chose."""

    attack: str
    n_train: int
    n_test: int
    metrics: dict[str, float]  # auroc, auprc, acc, fpr95, asr, pr, num_heads (+ active_heads)
    heads: list[tuple[int, int]]
    threshold: float
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
            dict(attack=f.attack, n_train=f.n_train, n_test=f.n_test, threshold=f.threshold, heads=f.heads, **f.metrics)
            for f in self.folds
        ]
        payload = {"auroc_mean": self.auroc_mean, "auroc_min": self.auroc_min, "folds": folds}
        (directory / "loao.json").write_text(json.dumps(payload, indent=1))
        with open(directory / "loao.csv", "w", newline="") as handle:
            columns = ["attack", "n_train", "n_test", "threshold", *self.folds[0].metrics]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(folds)
        return directory / "loao.json"


def leave_one_attack_out(
    features: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str] | np.ndarray,
    *,
    top_k: int | float = 16,
    detector: DetectorSpec = LogisticDetector,
    val_fraction: float = 0.2,
    seed: int = 0,
    threshold_rule: Literal["tpr", "youden"] = "tpr",
    target_tpr: float = 0.95,
    probe_l2: float = 1e-2,
    max_iter: int = 1000,
) -> LoaoResult:
    """One fold per attack family; see the module docstring for what each fold may see.

    Args:
        features: ``[n, layers, heads, head_dim]`` activations at the first generated token.
        labels: ``[n]``, 0 benign and 1 malicious.
        attacks: Attack family of each prompt (benign prompts included): the groups.
        top_k: Heads fed to the detector: a count, or a float in (0, 1] for a fraction of all heads.
        detector: An unfitted detector (cloned for every fold) or a factory returning one.
        val_fraction: Share of the training families' rows (stratified) that chooses the threshold.
        seed: Seeds the splits, the head ranking and the detector's initialization.
        threshold_rule: ``choose_threshold`` rule: ``"tpr"`` (reach ``target_tpr``) or ``"youden"``.
        target_tpr: Validation TPR the threshold must reach with the ``"tpr"`` rule.
        probe_l2: L2 penalty of the per-head ranking probes.
        max_iter: Most iterations of the detector's full-batch fit.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    attacks = np.asarray(attacks, dtype=str)
    if attacks.shape != (len(labels),) or features.shape[0] != len(labels):
        sizes = f"{features.shape[0]}, {len(labels)}, {attacks.shape}"
        raise ValueError(f"features, labels and attacks disagree on the number of prompts: {sizes}")
    folds = list(LeaveOneGroupOut().split(np.zeros(len(labels)), labels.numpy(), groups=attacks))
    for train_rows, test_rows in folds:  # check every fold before fitting any
        family = str(attacks[test_rows[0]])
        require_classes(labels[test_rows], f"fold {family!r}: the held-out family")
        require_classes(labels[train_rows], f"fold {family!r}: the training families")
    settings = dict(
        top_k=top_k,
        detector=detector,
        val_fraction=val_fraction,
        seed=seed,
        threshold_rule=threshold_rule,
        target_tpr=target_tpr,
        probe_l2=probe_l2,
        max_iter=max_iter,
    )
    results = []
    for train_rows, test_rows in folds:
        family = str(attacks[test_rows[0]])
        train_rows, test_rows = torch.as_tensor(train_rows), torch.as_tensor(test_rows)
        fitted = fit_head_detector(
            features[train_rows],
            labels[train_rows],
            name=f"fold {family!r}: the training families",
            **settings,
        )
        part = f"fold {family!r}: the held-out family"
        metrics = _evaluate(fitted, features[test_rows], labels[test_rows], part=part)
        results.append(
            FoldResult(family, len(train_rows), len(test_rows), metrics, fitted.heads, fitted.threshold, fitted)
        )
    return LoaoResult(results)


@dataclass
class TransferResult:
    """``auroc[i, j]``: detector trained on family ``families[i]``, tested on family ``families[j]``."""

    families: list[str]
    auroc: torch.Tensor  # [families, families]
    metrics: list[list[dict[str, float]]]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"families": self.families, "auroc": self.auroc.tolist(), "metrics": self.metrics}
        (directory / "transfer.json").write_text(json.dumps(payload, indent=1))
        return directory / "transfer.json"

    def plot(self, path: str | Path) -> Path:
        return plot_heatmap(
            self.auroc,
            path,
            title="Transfer AUROC",
            xlabel="tested on",
            ylabel="trained on",
            colorbar_label="AUROC",
            xticklabels=self.families,
            yticklabels=self.families,
            annotate=True,
            vmin=0.5,
            vmax=1.0,
        )


def transfer_matrix(
    features: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str] | np.ndarray,
    *,
    test_fraction: float = 0.3,
    top_k: int | float = 16,
    detector: DetectorSpec = LogisticDetector,
    val_fraction: float = 0.2,
    seed: int = 0,
    threshold_rule: Literal["tpr", "youden"] = "tpr",
    target_tpr: float = 0.95,
    probe_l2: float = 1e-2,
    max_iter: int = 1000,
) -> TransferResult:
    """Train on one family, test on each family; families ordered as ``np.unique``.

    Every family is split once (stratified) into a training part and a test part. Cell ``(A, B)``
    fits heads, scaler, detector and threshold on A's training part and scores B's test part, so
    each column is measured on the same prompts and no test prompt is ever trained on. The other
    arguments are those of ``leave_one_attack_out``.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    attacks = np.asarray(attacks, dtype=str)
    families = [str(family) for family in np.unique(attacks)]
    train_parts, test_parts = {}, {}
    for family in families:
        rows = torch.as_tensor(np.flatnonzero(attacks == family))
        kept, held_out = stratified_split(labels[rows], test_fraction, seed, part=f"family {family!r}")
        train_parts[family], test_parts[family] = rows[kept], rows[held_out]
    table = []
    for source in families:
        rows = train_parts[source]
        fitted = fit_head_detector(
            features[rows],
            labels[rows],
            top_k=top_k,
            detector=detector,
            val_fraction=val_fraction,
            seed=seed,
            threshold_rule=threshold_rule,
            target_tpr=target_tpr,
            probe_l2=probe_l2,
            max_iter=max_iter,
            name=f"family {source!r} training part",
        )
        row = []
        for target in families:
            rows = test_parts[target]
            row.append(_evaluate(fitted, features[rows], labels[rows], part=f"family {target!r} test part"))
        table.append(row)
    auroc = torch.tensor([[cell["auroc"] for cell in row] for row in table], dtype=torch.float64)
    return TransferResult(families, auroc, table)
