"""Metrics against scikit-learn / scipy on random scores with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from sahs.eval import metrics


def _scores(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return np.round(rng.normal(size=n) + labels, 1), labels  # rounding makes many ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_auprc_match_sklearn_with_ties(seed: int) -> None:
    scores, labels = _scores(seed)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_batched_auroc_matches_sklearn_row_by_row() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=(7, 200)) + labels * np.linspace(0, 2, 7)[:, None], 1)
    batched = metrics.batched_auroc(torch.tensor(scores), torch.tensor(labels)).numpy()
    np.testing.assert_allclose(batched, [roc_auc_score(labels, row) for row in scores], atol=1e-12)


def test_average_ranks_match_scipy() -> None:
    values = torch.tensor(np.round(np.random.default_rng(4).normal(size=(5, 50)), 1))
    np.testing.assert_array_equal(metrics.average_ranks(values).numpy(), rankdata(values.numpy(), axis=-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr_at_95_tpr_matches_roc_curve(seed: int) -> None:
    scores, labels = _scores(seed)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert metrics.fpr_at_tpr(scores, labels, 0.95) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)])


def test_asr_and_pr_are_the_misses_of_roc_curve() -> None:
    scores, labels = _scores(5)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    for i in range(1, len(thresholds), 7):  # thresholds[0] is +inf
        assert metrics.attack_success_rate(scores, labels, thresholds[i]) == pytest.approx(1 - tpr[i])
        assert metrics.passing_rate(scores, labels, thresholds[i]) == pytest.approx(1 - fpr[i])


def test_accuracy_matches_sklearn() -> None:
    scores, labels = _scores(6)
    assert metrics.accuracy(scores, labels, 0.5) == pytest.approx(accuracy_score(labels, scores >= 0.5))


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_tpr_threshold_is_the_highest_reaching_the_target(target: float) -> None:
    scores, labels = _scores(7)
    threshold = metrics.choose_threshold(scores, labels, "tpr", target)
    tpr = lambda t: np.mean(scores[labels == 1] >= t)  # noqa: E731
    assert tpr(threshold) >= target
    assert tpr(np.min(scores[scores > threshold])) < target  # the next distinct score misses the target
    assert metrics.attack_success_rate(scores, labels, threshold) <= 1 - target


def test_youden_threshold_matches_roc_curve_argmax() -> None:
    scores, labels = _scores(8)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert metrics.choose_threshold(scores, labels, "youden") == thresholds[np.argmax(tpr - fpr)]


def test_report_holds_every_metric() -> None:
    scores, labels = _scores(9)
    threshold = 0.8  # neither 0.5 nor the 95%-TPR point: an entry computed at the wrong threshold fails
    report = metrics.detection_report(scores, labels, threshold=threshold, part="test")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    expected = {
        "auroc": roc_auc_score(labels, scores),
        "auprc": average_precision_score(labels, scores),
        "acc@thr": accuracy_score(labels, scores >= threshold),
        "fpr95": fpr[np.searchsorted(tpr, 0.95)],
        "asr": np.mean(scores[labels == 1] < threshold),
        "pr": np.mean(scores[labels == 0] < threshold),
    }
    assert len({round(value, 6) for value in expected.values()}) == len(expected)  # swapped entries would show
    assert report == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, y: metrics.auroc(s, y, part="val"),
        lambda s, y: metrics.auprc(s, y, part="val"),
        lambda s, y: metrics.fpr_at_tpr(s, y, part="val"),
        lambda s, y: metrics.choose_threshold(s, y, part="val"),
        lambda s, y: metrics.passing_rate(s, y, 0.0, part="val"),
    ],
)
def test_part_without_benign_prompts_raises_naming_it(call) -> None:
    with pytest.raises(ValueError, match=r"val has no benign prompts \(label 0\)"):
        call(np.array([0.1, 0.5, 0.9]), np.array([1, 1, 1]))


def test_asr_needs_malicious_prompts_and_scores_must_be_finite() -> None:
    with pytest.raises(ValueError, match="test has no malicious prompts"):
        metrics.attack_success_rate([0.1, 0.2], [0, 0], 0.0, part="test")
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0.1, float("nan")], [0, 1])
