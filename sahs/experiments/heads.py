"""A detector on the top-k heads, with the ranking, scaler and threshold fitted beside it on one part."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sahs.data.splits import split_rows
from sahs.eval.metrics import choose_threshold, detection_report
from sahs.eval.probes import HeadRanking, rank_heads
from sahs.experiments.settings import LoaoSettings
from sahs.models.detectors import Detector


def select_heads(features: torch.Tensor, heads: Sequence[tuple[int, int]],
                 layers: Sequence[int] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate model ``(layer, head)`` pairs: ``[n, len(layers), heads, head_dim]`` -> ``[n, k * head_dim]``.

    ``layers`` names the model layer of each entry of the features' layer axis (``0..L-1`` when None).
    ``rows`` keeps only those rows; only the chosen heads of the chosen rows are read (float32 out).
    """
    layers = list(range(features.shape[1])) if layers is None else [int(layer) for layer in layers]
    missing = sorted({layer for layer, _ in heads} - set(layers))
    if missing:
        raise ValueError(f"heads of layers {missing} were asked for, but the features hold layers {layers}")
    positions = torch.tensor([layers.index(layer) for layer, _ in heads])
    head_index = torch.tensor([head for _, head in heads])
    features = torch.as_tensor(features)
    if rows is None:
        return features[:, positions, head_index].flatten(1).float()
    rows = torch.as_tensor(rows).long()[:, None]
    return features[rows, positions[None], head_index[None]].flatten(1).float()  # [rows, k, head_dim] gathered at once


@dataclass
class HeadDetector:
    """A detector on the top-k heads with the scaler and threshold learned alongside it."""

    heads: list[tuple[int, int]]  # model (layer, head), best first
    layers: list[int]  # model layer of each entry of the features' layer axis
    mean: torch.Tensor  # [k * head_dim]
    std: torch.Tensor  # [k * head_dim]
    detector: Detector
    threshold: float
    ranking: HeadRanking

    def inputs(self, features: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized detector inputs ``[n, k * head_dim]`` from ``[n, layers, heads, head_dim]`` or its ``rows``."""
        return (select_heads(features, self.heads, self.layers, rows) - self.mean) / self.std

    def decision_function(self, features: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.detector.decision_function(self.inputs(features, rows))

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor, part: str,
                 rows: torch.Tensor | None = None) -> dict[str, float]:
        """Every detection metric on these rows (``rows`` of ``features`` and ``labels``, or all) at the threshold."""
        labels = torch.as_tensor(labels) if rows is None else torch.as_tensor(labels)[rows]
        metrics = detection_report(self.decision_function(features, rows), labels, self.threshold, part=part)
        metrics["num_heads"] = float(len(self.heads))
        if hasattr(self.detector, "active_heads") and getattr(self.detector, "head_dim", None):
            metrics["active_heads"] = float(self.detector.active_heads())
        return metrics


def fit_head_detector(
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: LoaoSettings = LoaoSettings(),
    *,
    rows: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    attacks: Sequence[str] | np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    name: str = "training rows",
    rank: Callable[..., HeadRanking] | None = None,
) -> HeadDetector:
    """Locate heads, standardize, fit the detector and choose its threshold, all on the rows given.

    A ``settings.val_fraction`` of the rows (stratified by label and attack, whole requests) only
    chooses the threshold; the rest ranks the heads (``rank``: a ``RankingStore``'s ``rank``, or
    ``rank_heads`` when None), gives the scaler's mean/std and fits the detector (full batch).
    ``rows`` picks the rows of ``features``, ``labels``, ``attacks`` and ``groups`` to use (all when
    None) without copying the features. ``name`` labels the rows in error messages.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    layers = list(range(features.shape[1])) if layers is None else [int(layer) for layer in layers]
    rows = torch.arange(len(labels)) if rows is None else torch.as_tensor(rows).cpu().long()
    pick = (lambda values: None if values is None else np.asarray(values)[rows.numpy()])
    fit_part, val_part = split_rows(labels[rows], [settings.val_fraction], settings.seed, attacks=pick(attacks),
                                    groups=pick(groups), part=name, both_classes=True)
    fit_rows, val_rows = rows[fit_part], rows[val_part]
    ranking = (rank or rank_heads)(features, labels, rows=fit_rows, layers=layers, groups=groups, attacks=attacks,
                   seed=settings.seed, l2=settings.probe_l2)
    heads = ranking.top(settings.resolve_top_k(ranking.auroc.numel()))
    x_fit = select_heads(features, heads, layers, fit_rows)  # [n_fit, k * head_dim]
    mean, std = x_fit.mean(dim=0), x_fit.std(dim=0, correction=0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(settings.seed)
        model = settings.new_detector().fit(x_fit.sub_(mean).div_(std), labels[fit_rows], max_iter=settings.max_iter)
    val_scores = model.decision_function((select_heads(features, heads, layers, val_rows) - mean) / std)
    threshold = choose_threshold(val_scores, labels[val_rows], settings.threshold_rule, settings.target_tpr,
                                 part=f"{name} (validation)")
    return HeadDetector(heads, layers, mean, std, model, threshold, ranking)
