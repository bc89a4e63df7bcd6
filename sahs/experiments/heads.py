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
    features = torch.as_tensor(features)
    n, _, num_heads, head_dim = features.shape
    flat = features.reshape(n, -1, head_dim)  # a view of a contiguous cache: [n, layers * heads, head_dim]
    rows = None if rows is None else torch.as_tensor(rows, device=features.device).long()
    out = torch.empty(n if rows is None else len(rows), len(heads), head_dim, device=features.device)
    for column, (layer, head) in enumerate(heads):  # one head at a time: a row gather, converted into place
        picked = flat[:, layers.index(layer) * num_heads + head]
        out[:, column] = picked if rows is None else picked.index_select(0, rows)
    return out.flatten(1)


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
                 rows: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> dict[str, float]:
        """Every detection metric on these rows (``rows`` of ``features`` and ``labels``, or all) at the threshold.

        ``scores``: the rows' ``decision_function``, when the caller already has it.
        """
        labels = torch.as_tensor(labels) if rows is None else torch.as_tensor(labels)[rows]
        scores = self.decision_function(features, rows) if scores is None else scores
        metrics = detection_report(scores, labels, self.threshold, part=part)
        metrics["num_heads"] = float(len(self.heads))
        if hasattr(self.detector, "active_heads") and getattr(self.detector, "head_dim", None):
            metrics["active_heads"] = float(self.detector.active_heads())
        return metrics


def _center_and_scale(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize ``x [n, d]`` in place by its column means and population stds (two passes); returns both.

    The squares are summed a block of rows at a time: no ``[n, d]`` temporary, and column sums of a
    row-major matrix run at memory speed, unlike ``Tensor.std(dim=0)``.
    """
    mean = x.mean(dim=0)
    x.sub_(mean)
    squares = torch.zeros_like(mean)
    scratch = torch.empty(min(block, len(x)), x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, len(x), block):
        rows = x[start : start + block]
        squares += torch.mul(rows, rows, out=scratch[: len(rows)]).sum(dim=0)
    std = squares.div_(len(x)).sqrt_().clamp_min_(1e-6)
    x.div_(std)
    return mean, std


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
    x_fit = select_heads(features, heads, layers, fit_rows)  # [n_fit, k * head_dim], standardized in place
    mean, std = _center_and_scale(x_fit)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(settings.seed)
        model = settings.new_detector().fit(x_fit, labels[fit_rows], max_iter=settings.max_iter)
    val_scores = model.decision_function((select_heads(features, heads, layers, val_rows) - mean) / std)
    threshold = choose_threshold(val_scores, labels[val_rows], settings.threshold_rule, settings.target_tpr,
                                 part=f"{name} (validation)")
    return HeadDetector(heads, layers, mean, std, model, threshold, ranking)
