"""A detector on the top-k heads, with the ranking, scaler and threshold fitted beside it on one part."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sahs.data.splits import split_rows
from sahs.eval.metrics import choose_threshold, detection_report
from sahs.eval.probes import HeadRanking, rank_heads
from sahs.experiments.settings import LoaoSettings
from sahs.models.detectors import Detector


def select_heads(features: torch.Tensor, heads: Sequence[tuple[int, int]],
                 layers: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate model ``(layer, head)`` pairs: ``[n, len(layers), heads, head_dim]`` -> ``[n, k * head_dim]``.

    ``layers`` names the model layer of each entry of the features' layer axis (``0..L-1`` when None).
    """
    layers = list(range(features.shape[1])) if layers is None else [int(layer) for layer in layers]
    missing = sorted({layer for layer, _ in heads} - set(layers))
    if missing:
        raise ValueError(f"heads of layers {missing} were asked for, but the features hold layers {layers}")
    positions = torch.tensor([layers.index(layer) for layer, _ in heads])
    head_index = torch.tensor([head for _, head in heads])
    return torch.as_tensor(features)[:, positions, head_index].flatten(1).float()


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

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Standardized detector inputs ``[n, k * head_dim]`` from ``[n, layers, heads, head_dim]``."""
        return (select_heads(features, self.heads, self.layers) - self.mean) / self.std

    def decision_function(self, features: torch.Tensor) -> torch.Tensor:
        return self.detector.decision_function(self.inputs(features))

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor, part: str) -> dict[str, float]:
        """Every detection metric on these rows at the fitted threshold, plus the head counts."""
        metrics = detection_report(self.decision_function(features), labels, self.threshold, part=part)
        metrics["num_heads"] = float(len(self.heads))
        if hasattr(self.detector, "active_heads") and getattr(self.detector, "head_dim", None):
            metrics["active_heads"] = float(self.detector.active_heads())
        return metrics


def fit_head_detector(
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: LoaoSettings = LoaoSettings(),
    *,
    layers: Sequence[int] | None = None,
    attacks: Sequence[str] | np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    name: str = "training rows",
) -> HeadDetector:
    """Locate heads, standardize, fit the detector and choose its threshold, all on the rows given.

    A ``settings.val_fraction`` of the rows (stratified by label and attack, whole requests) only
    chooses the threshold; the rest ranks the heads (``rank_heads``), gives the scaler's mean/std and
    fits the detector (full batch). ``name`` labels the rows in error messages.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
    layers = list(range(features.shape[1])) if layers is None else [int(layer) for layer in layers]
    fit_rows, val_rows = split_rows(labels, [settings.val_fraction], settings.seed, attacks=attacks,
                                    groups=groups, part=name, both_classes=True)
    pick = (lambda values: None if values is None else np.asarray(values)[fit_rows.numpy()])
    ranking = rank_heads(features[fit_rows], labels[fit_rows], layers=layers, groups=pick(groups),
                         attacks=pick(attacks), seed=settings.seed, l2=settings.probe_l2)
    heads = ranking.top(settings.resolve_top_k(ranking.auroc.numel()))
    x_fit = select_heads(features[fit_rows], heads, layers)  # [n_fit, k * head_dim]
    mean, std = x_fit.mean(dim=0), x_fit.std(dim=0, correction=0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(settings.seed)
        model = settings.new_detector().fit((x_fit - mean) / std, labels[fit_rows], max_iter=settings.max_iter)
    val_scores = model.decision_function((select_heads(features[val_rows], heads, layers) - mean) / std)
    threshold = choose_threshold(val_scores, labels[val_rows], settings.threshold_rule, settings.target_tpr,
                                 part=f"{name} (validation)")
    return HeadDetector(heads, layers, mean, std, model, threshold, ranking)
