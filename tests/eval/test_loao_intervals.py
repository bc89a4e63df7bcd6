"""LOAO's intervals, repeats, convergence records and scores.csv, against recomputation from the folds."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out, loao_folds
from sahs.experiments.settings import SettingsError
from sahs.eval.intervals import Part, bootstrap_mean_auroc
from sahs.models.detectors import LogisticDetector

FAMILIES = ("figstep", "hades", "mmsafety")
SIGNAL = {(1, 2): 1.0, (2, 4): 0.8}


def with_requests(labels: torch.Tensor, size: int = 2) -> np.ndarray:
    """Requests of ``size`` consecutive prompts of one family (planted_heads cycles families row by row)."""
    n = len(labels)
    return np.array([f"q{(row // (size * len(FAMILIES))) * len(FAMILIES) + row % len(FAMILIES)}" for row in range(n)])


class CappedLogistic(LogisticDetector):
    """A logistic detector that says whether its fit stopped at max_iter, as every detector does."""

    def fit(self, x, y, max_iter: int = 1000):
        super().fit(x, y, max_iter=max_iter)
        self.converged_ = self.n_iter_ < max_iter
        return self


def read_scores(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_scores_file_holds_every_test_row_once_and_reproduces_each_interval(make_features, tmp_path) -> None:
    features, labels, attacks = make_features(n=240, signal=SIGNAL, families=FAMILIES)
    groups = with_requests(labels)
    labels = torch.as_tensor(labels)
    for g in np.unique(groups):  # one label per request, as a question has
        labels[torch.as_tensor(groups == g)] = labels[torch.as_tensor(groups == g)][0]
    ids = np.array([f"p{row}" for row in range(len(labels))])
    settings = LoaoSettings(top_k=2, n_boot=300, level=0.9)
    result = leave_one_attack_out(features, labels, attacks, settings, groups=groups, ids=ids)
    result.save(tmp_path)
    lines = read_scores(tmp_path / "scores.csv")
    assert list(lines[0]) == ["fold", "row", "id", "group", "label", "score"]
    folds = loao_folds(labels, attacks, groups)
    parts = []
    for fold, expected in zip(result.folds, folds, strict=True):
        mine = [line for line in lines if line["fold"] == fold.attack]
        rows = np.array([int(line["row"]) for line in mine])
        assert np.array_equal(rows, expected.test_rows.numpy())
        scores = np.array([float(line["score"]) for line in mine])
        recomputed = fold.model.decision_function(features, torch.as_tensor(rows)).double().numpy()
        assert np.allclose(scores, recomputed, rtol=0, atol=1e-6)
        assert [line["id"] for line in mine] == ids[rows].tolist()
        assert [line["group"] for line in mine] == groups[rows].tolist()
        assert np.array_equal([int(line["label"]) for line in mine], labels[rows].numpy())
        assert fold.metrics["auroc"] == pytest.approx(roc_auc_score(labels[rows].numpy(), scores), abs=1e-6)
        parts.append(Part.of(scores, labels[rows].numpy(), groups[rows]))
    mean, per_fold = bootstrap_mean_auroc(parts, n_boot=300, seed=0, level=0.9)
    assert (result.auroc_interval.low, result.auroc_interval.high) == pytest.approx((mean.low, mean.high), abs=1e-6)
    for fold, interval in zip(result.folds, per_fold):
        assert fold.auroc_ci.low < fold.metrics["auroc"] < fold.auroc_ci.high
        assert (fold.auroc_ci.low, fold.auroc_ci.high) == pytest.approx((interval.low, interval.high), abs=1e-6)
    saved = json.loads((tmp_path / "loao.json").read_text())
    assert saved["level"] == 0.9 and saved["auroc_mean_ci_low"] == result.auroc_interval.low
    with open(tmp_path / "loao.csv") as handle:
        assert [float(row["auroc_ci_high"]) for row in csv.DictReader(handle)] == [f.auroc_ci.high for f in result.folds]


def test_repeats_average_runs_with_successive_seeds(make_features, tmp_path) -> None:
    features, labels, attacks = make_features(n=210, signal=SIGNAL, families=FAMILIES)
    settings = LoaoSettings(top_k=2, n_boot=200, val_fraction=0.3)
    runs = [leave_one_attack_out(features, labels, attacks, settings.with_(seed=seed)) for seed in (4, 5, 6)]
    repeated = leave_one_attack_out(features, labels, attacks, settings.with_(seed=4, repeats=3))
    means = [run.auroc_mean for run in runs]
    assert runs[0].folds[0].threshold != runs[1].folds[0].threshold  # the seeds do change the splits
    assert repeated.auroc_mean == pytest.approx(np.mean(means), abs=1e-12)
    assert repeated.auroc_mean_std == pytest.approx(np.std(means, ddof=1), abs=1e-12)
    for index, fold in enumerate(repeated.folds):
        for name, value in fold.metrics.items():
            assert value == pytest.approx(np.mean([run.folds[index].metrics[name] for run in runs]), abs=1e-12)
    summary = repeated.summary()
    assert summary["loao/auroc_mean_std"] == repeated.auroc_mean_std
    assert summary["loao/auroc_mean_ci_low"] <= summary["loao/auroc_mean"] <= summary["loao/auroc_mean_ci_high"]
    assert "loao/auroc_mean_std" not in runs[0].summary()
    repeated.save(tmp_path)
    lines = read_scores(tmp_path / "scores.csv")
    assert sorted({line["repeat"] for line in lines}) == ["0", "1", "2"]
    assert len(lines) == 3 * len(labels)  # each repeat tests every row once
    saved = json.loads((tmp_path / "loao.json").read_text())
    assert [entry["auroc_mean"] for entry in saved["repeats"]] == pytest.approx(means, abs=1e-12)


@pytest.mark.filterwarnings("ignore:.*stopped at max_iter")
def test_folds_that_hit_max_iter_are_counted(make_features) -> None:
    features, labels, attacks = make_features(n=210, signal=SIGNAL, families=FAMILIES)
    capped = leave_one_attack_out(features, labels, attacks,
                                  LoaoSettings(top_k=2, detector=CappedLogistic(l2=1e-4), max_iter=2, n_boot=50))
    assert [(fold.n_iter, fold.converged) for fold in capped.folds] == [(2, False)] * 3
    assert capped.summary()["loao/folds_not_converged"] == 3
    done = leave_one_attack_out(features, labels, attacks, LoaoSettings(top_k=2, detector=CappedLogistic(), n_boot=50))
    assert all(fold.converged and fold.n_iter == fold.model.detector.n_iter_ < 1000 for fold in done.folds)
    assert done.summary()["loao/folds_not_converged"] == 0


@pytest.mark.parametrize("change, words", [({"n_boot": 0}, "n_boot"), ({"level": 1.0}, "level"),
                                           ({"repeats": 0}, "repeats")])
def test_interval_settings_that_cannot_work_are_refused(change, words) -> None:
    with pytest.raises(SettingsError, match=words):
        LoaoSettings(**change)
