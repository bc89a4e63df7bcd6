"""What each part of a LOAO fold's training rows may reach: the validation rows choose the threshold only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sahs.data.splits import split_rows
from sahs.eval.metrics import choose_threshold
from sahs.experiments import LoaoSettings
from sahs.experiments.heads import fit_head_detector, select_heads
from sahs.experiments.loao import loao_folds
from sahs.models.detectors import LogisticDetector

FAMILIES = ("figstep", "hades", "mmsafety")


@pytest.fixture
def fold(make_features):
    """A fold's training rows, and which of them fit (heads, scaler, detector) and which validate."""
    features, labels, attacks = make_features(n=300, signal={(1, 2): 1.5, (2, 4): 1.0}, families=FAMILIES,
                                              family_shift=0.5)
    rows = loao_folds(labels, attacks)[0].train_rows
    settings = LoaoSettings(top_k=2, detector=LogisticDetector(l2=1e-2), val_fraction=0.3, seed=3)
    # The documented split: a stratified (label, attack) val_fraction of the rows, at the settings' seed.
    fit_part, val_part = split_rows(labels[rows], [settings.val_fraction], settings.seed,
                                    attacks=attacks[rows.numpy()], both_classes=True)
    return features, labels, attacks, rows, rows[fit_part], rows[val_part], settings


def test_the_threshold_is_chosen_on_the_validation_rows(fold) -> None:
    features, labels, attacks, rows, fit_rows, val_rows, settings = fold
    fitted = fit_head_detector(features, labels, settings, rows=rows, attacks=attacks)
    x_val = (select_heads(features, fitted.heads, rows=val_rows) - fitted.mean) / fitted.std
    expected = choose_threshold(fitted.detector.decision_function(x_val), labels[val_rows], settings.threshold_rule,
                                settings.target_tpr)
    assert fitted.threshold == pytest.approx(expected, abs=1e-6)
    # Rescoring the validation rows moves the threshold, and nothing else.
    moved = features.clone()
    moved[val_rows] = 2.0 * features[val_rows] + 0.5
    refitted = fit_head_detector(moved, labels, settings, rows=rows, attacks=attacks)
    assert refitted.threshold != pytest.approx(fitted.threshold, abs=1e-3)
    assert torch.equal(refitted.detector.coef_, fitted.detector.coef_)


def test_the_scaler_is_fitted_on_the_fit_rows_alone(fold) -> None:
    features, labels, attacks, rows, fit_rows, val_rows, settings = fold
    fitted = fit_head_detector(features, labels, settings, rows=rows, attacks=attacks)
    x_fit = select_heads(features, fitted.heads, rows=fit_rows).double()
    assert torch.allclose(fitted.mean.double(), x_fit.mean(dim=0), atol=1e-5)
    assert torch.allclose(fitted.std.double(), x_fit.std(dim=0, unbiased=False), atol=1e-5)
    # Moving the validation rows (or any row outside the fold's training) leaves the scaler where it was.
    moved = features.clone()
    outside = np.setdiff1d(np.arange(len(labels)), fit_rows.numpy())
    moved[outside] = 3.0 * features[outside] - 1.0
    refitted = fit_head_detector(moved, labels, settings, rows=rows, attacks=attacks)
    assert refitted.heads == fitted.heads
    assert torch.equal(refitted.mean, fitted.mean) and torch.equal(refitted.std, fitted.std)
