"""One settings object for everything an experiment fits in a fold: heads, detector, threshold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from sahs.errors import UserError
from sahs.models.detectors import Detector, LogisticDetector

DetectorSpec = Detector | Callable[[], Detector]


class SettingsError(UserError, ValueError):
    """An experiment setting that cannot work (``sahs`` shows it as one line)."""


@dataclass(frozen=True)
class LoaoSettings:
    """How each fold (of LOAO, the transfer matrix, a sweep run) locates heads and fits its detector.

    Args:
        top_k: Heads fed to the detector: a count, or a float in (0, 1] for a fraction of all heads.
        detector: An unfitted detector (cloned for every fold) or a factory returning one.
        val_fraction: Share of the training rows (stratified, whole requests) that chooses the threshold.
        seed: Seeds the splits, the head ranking and the detector's initialization.
        threshold_rule: ``choose_threshold`` rule: ``"tpr"`` (reach ``target_tpr``) or ``"youden"``.
        target_tpr: Validation TPR the threshold must reach with the ``"tpr"`` rule.
        probe_l2: L2 penalty of the per-head ranking probes.
        max_iter: Most iterations of the detector's full-batch fit.
        n_boot: Bootstrap replicates of the AUROC intervals (whole requests resampled within each fold).
        level: Confidence level of the intervals, in (0, 1).
        repeats: Runs of the whole protocol, with seeds ``seed``, ``seed + 1``, ...; figures are their
            mean, and ``auroc_mean`` also gets its standard deviation across repeats.
    """

    top_k: int | float = 16
    detector: DetectorSpec = LogisticDetector
    val_fraction: float = 0.2
    seed: int = 0
    threshold_rule: Literal["tpr", "youden"] = "tpr"
    target_tpr: float = 0.95
    probe_l2: float = 1e-2
    max_iter: int = 1000
    n_boot: int = 1000
    level: float = 0.95
    repeats: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise SettingsError(f"val_fraction must be in (0, 1): the threshold needs validation rows, got {self.val_fraction}")
        if isinstance(self.top_k, float) and not 0 < self.top_k <= 1:
            raise SettingsError(f"a fractional top_k must be in (0, 1], got {self.top_k}: use a count >= 1 "
                                "or a share of all heads")
        if isinstance(self.top_k, int) and self.top_k < 1:
            raise SettingsError(f"top_k must be at least 1, got {self.top_k}")
        if not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise SettingsError(f"n_boot must be a count of bootstrap replicates >= 1 (1000 is usual), got {self.n_boot}")
        if not 0 < self.level < 1:
            raise SettingsError(f"level must be a confidence level in (0, 1) such as 0.95, got {self.level}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise SettingsError(f"repeats must be a count >= 1 of runs of the protocol, got {self.repeats}")

    def with_(self, **changes) -> LoaoSettings:
        """A copy with some settings changed."""
        return replace(self, **changes)

    def new_detector(self) -> Detector:
        """A fresh, unfitted detector for one fold."""
        return self.detector.clone() if isinstance(self.detector, Detector) else self.detector()

    def resolve_top_k(self, num_heads: int) -> int:
        """Number of heads: an int is a count, a float a fraction of ``num_heads`` (at least one)."""
        if isinstance(self.top_k, float):
            return max(1, round(self.top_k * num_heads))
        if not 1 <= self.top_k <= num_heads:
            raise SettingsError(f"top_k must be in [1, {num_heads}], got {self.top_k}")
        return self.top_k
