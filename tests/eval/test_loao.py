"""Leave-one-attack-out: generalization on shared signals, no leakage, clear failures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sahs.experiments import LoaoSettings, heads, loao
from sahs.experiments.loao import leave_one_attack_out
from sahs.experiments.transfer import transfer_matrix
from sahs.models.detectors import LogisticDetector, SparseL1Detector

FAMILIES = ("figstep", "hades", "mmsafety", "qr")
SHARED = {(1, 2): 3.5, (2, 4): 3.0}


def test_shared_signal_generalizes_to_every_held_out_family(make_features) -> None:
    features, labels, attacks = make_features(n=800, signal=SHARED, families=FAMILIES, family_shift=1.0)
    result = leave_one_attack_out(features, labels, attacks, LoaoSettings(top_k=2, detector=LogisticDetector(l2=1e-2)))
    assert [fold.attack for fold in result.folds] == sorted(FAMILIES)
    assert result.auroc_mean >= 0.95 and result.auroc_min == min(f.metrics["auroc"] for f in result.folds)
    for fold in result.folds:
        assert set(fold.heads) == set(SHARED) and fold.metrics["num_heads"] == 2
        assert fold.n_test == np.sum(attacks == fold.attack) and fold.n_train == 800 - fold.n_test
        assert set(fold.metrics) == {"auroc", "auprc", "acc@thr", "fpr95", "asr", "pr", "num_heads"}


def _fold(result: loao.LoaoResult, family: str) -> loao.FoldResult:
    return next(fold for fold in result.folds if fold.attack == family)


def test_held_out_family_cannot_change_what_its_fold_learns(make_features) -> None:
    features, labels, attacks = make_features(n=450, signal=SHARED, families=FAMILIES[:3], family_shift=1.0)
    held_out = torch.as_tensor(attacks == "hades")
    poisoned_features, poisoned_labels = features.clone(), labels.clone()
    poisoned_features[held_out] = 50 * torch.randn_like(features[held_out])  # other heads, other scale
    poisoned_labels[held_out] = 1 - labels[held_out]
    settings = LoaoSettings(top_k=3, detector=SparseL1Detector(l1=1e-3), seed=1)
    clean = leave_one_attack_out(features, labels, attacks, settings)
    poisoned = leave_one_attack_out(poisoned_features, poisoned_labels, attacks, settings)
    a, b = _fold(clean, "hades").model, _fold(poisoned, "hades").model
    assert a.heads == b.heads and a.threshold == b.threshold
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert torch.equal(a.detector.coef_, b.detector.coef_) and torch.equal(a.ranking.auroc, b.ranking.auroc)
    assert _fold(clean, "hades").metrics != _fold(poisoned, "hades").metrics  # its test data did change
    # The folds that train on the poisoned family do learn something else: the comparison has teeth.
    other_clean, other_poisoned = _fold(clean, "figstep").model, _fold(poisoned, "figstep").model
    assert not torch.equal(other_clean.detector.coef_, other_poisoned.detector.coef_)


def test_rank_heads_never_sees_a_held_out_row(make_features, monkeypatch) -> None:
    features, labels, attacks = make_features(n=300, signal=SHARED, families=FAMILIES[:3])
    family_of_row = {row.numpy().tobytes(): family for row, family in zip(features, attacks)}
    seen: list[list[str]] = []
    real = heads.rank_heads

    def spy(features, labels, *, rows, attacks, groups, **kwargs):  # the real ranking gets only these rows
        seen.append([family_of_row[row.numpy().tobytes()] for row in features[rows]])
        return real(features[rows], labels[rows], attacks=attacks[rows.numpy()], groups=groups, **kwargs)

    monkeypatch.setattr(heads, "rank_heads", spy)
    result = leave_one_attack_out(features, labels, attacks, LoaoSettings(top_k=2, val_fraction=0.25))
    assert len(seen) == len(result.folds)
    for fold, families in zip(result.folds, seen):
        assert fold.attack not in families
        assert len(families) == pytest.approx(0.75 * fold.n_train, abs=2)  # the validation rows are left out too


def test_fold_without_benign_prompts_raises_with_the_family_name(make_features, monkeypatch) -> None:
    features, labels, attacks = make_features(n=300, families=FAMILIES[:3])
    labels[torch.as_tensor(attacks == "mmsafety")] = 1
    monkeypatch.setattr(heads, "rank_heads", lambda *a, **k: pytest.fail("fitted before checking the folds"))
    with pytest.raises(ValueError, match=r"fold 'mmsafety': the held-out family has no benign prompts"):
        leave_one_attack_out(features, labels, attacks)


def test_top_k_fraction_and_detector_factory(make_features, tmp_path) -> None:
    features, labels, attacks = make_features(n=300, signal=SHARED, families=FAMILIES[:3])
    prototype = SparseL1Detector(l1=1e-2, group_lasso=True, head_dim=8)
    result = leave_one_attack_out(features, labels, attacks, LoaoSettings(top_k=0.25, detector=prototype))
    assert not prototype.built  # every fold fitted its own clone
    assert all(fold.metrics["num_heads"] == 6 and 1 <= fold.metrics["active_heads"] <= 6 for fold in result.folds)
    names = ["auroc", "auprc", "acc@thr", "fpr95", "asr", "pr", "num_heads", "active_heads"]
    assert sorted(result.folds[0].metrics) == sorted(names)
    over_folds = {name: [fold.metrics[name] for fold in result.folds] for name in names}
    summary = result.summary()
    expected = {"loao/auroc_mean": np.mean(over_folds["auroc"]), "loao/auroc_min": min(over_folds["auroc"])}
    expected.update({f"loao/{name}_mean": np.mean(over_folds[name]) for name in names if name != "auroc"})
    expected.update({f"loao/{fold.attack}/{name}": fold.metrics[name] for fold in result.folds for name in names})
    expected.update(result.auroc_interval.as_dict("loao/auroc_mean"))
    expected.update({f"loao/{fold.attack}/auroc_ci_{end}": getattr(fold.auroc_ci, end) for fold in result.folds
                     for end in ("low", "high")})
    expected["loao/folds_not_converged"] = sum(getattr(fold.model.detector, "converged_", None) is False
                                              for fold in result.folds)
    assert summary == pytest.approx(expected, abs=1e-12)

    saved = json.loads(result.save(tmp_path).read_text())
    assert saved["auroc_mean"] == pytest.approx(np.mean(over_folds["auroc"]))
    assert saved["auroc_min"] == min(over_folds["auroc"])
    assert (saved["auroc_mean_ci_low"], saved["auroc_mean_ci_high"]) == (result.auroc_interval.low,
                                                                         result.auroc_interval.high)
    for entry, fold in zip(saved["folds"], result.folds, strict=True):
        assert entry == {"attack": fold.attack, "n_train": fold.n_train, "n_test": fold.n_test,
                         "n_removed": fold.n_removed, "n_benign_share": fold.n_benign_share,
                         "threshold": fold.threshold,
                         "heads": [list(head) for head in fold.heads], **fold.metrics,
                         "auroc_ci_low": fold.auroc_ci.low, "auroc_ci_high": fold.auroc_ci.high,
                         "n_iter": fold.model.detector.n_iter_, "converged": fold.converged}
    with open(tmp_path / "loao.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["attack"] for row in rows] == [fold.attack for fold in result.folds]
    for row, fold in zip(rows, result.folds):
        assert {name: float(row[name]) for name in names} == fold.metrics


def test_transfer_matrix_separates_shared_from_family_specific_signals(make_features, tmp_path) -> None:
    families = FAMILIES[:3]
    features, labels, attacks = make_features(n=600, signal=SHARED, families=families)
    shared = transfer_matrix(features, labels, attacks, LoaoSettings(top_k=2))
    assert shared.families == sorted(families) and shared.auroc.shape == (3, 3)
    assert shared.auroc.min() >= 0.9
    # Now each family's label lives in a head of its own: only the diagonal can be learned.
    features, labels, attacks = make_features(n=600, signal={}, families=families, seed=1)
    for index, family in enumerate(families):
        rows = torch.as_tensor(attacks == family)
        features[rows, index, index, 0] += 3.5 * labels[rows]
    specific = transfer_matrix(features, labels, attacks, LoaoSettings(top_k=1))
    off_diagonal = specific.auroc[~torch.eye(3, dtype=torch.bool)]
    assert specific.auroc.diagonal().min() >= 0.9 and off_diagonal.max() <= 0.75
    assert specific.plot(tmp_path / "transfer.png").stat().st_size > 0
