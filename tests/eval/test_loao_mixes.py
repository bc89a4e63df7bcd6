"""Leave-one-attack-out on benchmark mixes: single-label sources, requests shared by several families."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out, loao_folds
from sahs.models.detectors import LogisticDetector

MMSB_FAMILIES = ("sd", "sd_typo", "typo", "text")  # every question in four forms, all malicious


def benchmark_mix(questions: int = 24, hades: int = 30, mmvet: int = 40, xstest: int = 24, seed: int = 0,
                  family_shift: float = 0.3):
    """Columns shaped like MM-SafetyBench + HADES (malicious) with MM-Vet + XSTest-safe (benign).

    Head (1, 2) carries the label; each family shifts every head by an offset of its own (scaled by
    ``family_shift``: with single-label families, large offsets make the source itself a label).
    """
    attacks = [family for q in range(questions) for family in MMSB_FAMILIES]
    groups = [f"mmsb-{q}" for q in range(questions) for _ in MMSB_FAMILIES]
    attacks += ["hades"] * hades + ["vqa"] * mmvet + ["xstest"] * xstest
    groups += [f"hades-{i}" for i in range(hades)] + [f"mmvet-{i}" for i in range(mmvet)]
    groups += [f"xstest-{i}" for i in range(xstest)]
    labels = torch.tensor([1] * (4 * questions + hades) + [0] * (mmvet + xstest))
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(labels), 3, 4, 8, generator=generator)
    families = sorted(set(attacks))
    offsets = family_shift * torch.randn(len(families), 3, 4, 8, generator=generator)
    features += offsets[torch.tensor([families.index(a) for a in attacks])]
    features[:, 1, 2, 0] += 3.0 * labels
    return features, labels, np.asarray(attacks), np.asarray(groups)


def test_single_label_mix_folds_follow_the_protocol() -> None:
    _, labels, attacks, groups = benchmark_mix()
    folds = loao_folds(labels, attacks, groups, seed=3)
    assert [fold.attack for fold in folds] == ["hades", "sd", "sd_typo", "text", "typo"]  # benign-only: no fold
    pool = np.isin(attacks, ["vqa", "xstest"])
    shares, tested_questions = [], Counter()
    for fold in folds:
        train, test = fold.train_rows.numpy(), fold.test_rows.numpy()
        assert not set(groups[train]) & set(groups[test])  # no request on both sides
        assert set(attacks[test][labels[test] == 1]) == {fold.attack} and not (attacks[train] == fold.attack).any()
        share = test[pool[test]]
        assert len(share) == fold.benign_share > 0 and (labels[share] == 0).all()
        shares.append(set(share.tolist()))
        assert not set(share.tolist()) & set(train.tolist())
        tested = set(groups[test])
        # Removed: the other forms of the questions this fold tests, and nothing else.
        other_forms = np.isin(groups, list(tested)) & (attacks != fold.attack) & ~pool
        assert fold.removed == other_forms.sum()
        assert set(train.tolist()) == set(np.flatnonzero((attacks != fold.attack) & ~np.isin(groups, list(tested))))
        tested_questions.update(g for g in tested if g.startswith("mmsb-"))
    assert sorted(tested_questions) == sorted({g for g in groups if g.startswith("mmsb-")})  # each exactly once
    assert set(tested_questions.values()) == {1}
    for family in MMSB_FAMILIES:  # 24 questions dealt over four families
        dealt = sum(1 for f in folds if f.attack == family for g in set(groups[f.test_rows.numpy()])
                    if g.startswith("mmsb-"))
        assert dealt == 6
    assert not any(a & b for i, a in enumerate(shares) for b in shares[i + 1:])  # disjoint shares
    assert set().union(*shares) == set(np.flatnonzero(pool).tolist())  # the whole pool, once
    for family in ("vqa", "xstest"):  # each share holds both benign sources in proportion
        per_share = [sum(attacks[i] == family for i in share) for share in shares]
        assert max(per_share) - min(per_share) <= 1


def test_single_label_mix_runs_and_reports_every_fold() -> None:
    features, labels, attacks, groups = benchmark_mix()
    result = leave_one_attack_out(features, labels, attacks, LoaoSettings(top_k=2), groups=groups)
    assert [fold.attack for fold in result.folds] == ["hades", "sd", "sd_typo", "text", "typo"]
    for fold in result.folds:
        assert (1, 2) in fold.heads and fold.metrics["auroc"] >= 0.9
        assert {"auroc", "asr", "pr"} <= set(fold.metrics) and fold.n_benign_share > 0
    assert result.summary()["loao/sd/pr"] == result.folds[1].metrics["pr"]


@pytest.mark.parametrize("family", ["sd", "hades"])
def test_held_out_rows_and_benign_share_cannot_change_what_the_fold_learns(family: str) -> None:
    features, labels, attacks, groups = benchmark_mix()
    settings = LoaoSettings(top_k=3, detector=LogisticDetector(l2=1e-2), seed=1)
    fold = next(f for f in loao_folds(labels, attacks, groups, seed=1) if f.attack == family)
    # The family's rows (tested or not), its benign share, and the other forms of its tested requests.
    hidden = torch.as_tensor((attacks == family) | np.isin(groups, groups[fold.test_rows.numpy()]))
    assert int(hidden.sum()) > fold.test_rows.numel() - fold.benign_share
    poisoned = features.clone()
    poisoned[hidden] = 50 * torch.randn_like(features[hidden])
    clean = leave_one_attack_out(features, labels, attacks, settings, groups=groups)
    dirty = leave_one_attack_out(poisoned, labels, attacks, settings, groups=groups)
    a = next(f for f in clean.folds if f.attack == family).model
    b = next(f for f in dirty.folds if f.attack == family).model
    assert a.heads == b.heads and a.threshold == b.threshold
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert torch.equal(a.detector.coef_, b.detector.coef_) and torch.equal(a.ranking.auroc, b.ranking.auroc)
    # Another fold trains on some of the poisoned rows: the comparison has teeth.
    other = "typo" if family == "hades" else "hades"
    assert not torch.equal(next(f for f in clean.folds if f.attack == other).model.detector.coef_,
                           next(f for f in dirty.folds if f.attack == other).model.detector.coef_)


def test_requests_shared_by_two_label_families_are_tested_once() -> None:
    # OfflineAttackSet with share_seeds: every family renders the same requests, both labels.
    requests, families = 40, ("text", "figstep", "template")
    attacks = np.asarray([f for _ in range(requests) for f in families])
    groups = np.asarray([f"req-{r}" for r in range(requests) for _ in families])
    labels = torch.as_tensor(np.repeat(np.arange(requests) % 2, len(families)))
    folds = loao_folds(labels, attacks, groups)
    assert [f.attack for f in folds] == sorted(families)
    tested = Counter(g for fold in folds for g in set(groups[fold.test_rows.numpy()]))
    assert len(tested) == requests and set(tested.values()) == {1}
    for fold in folds:
        test = fold.test_rows.numpy()
        assert set(attacks[test]) == {fold.attack} and fold.benign_share == 0
        assert not set(groups[fold.train_rows.numpy()]) & set(groups[test])
        assert fold.removed == 2 * len(test)  # the two other renderings of each tested request
        assert abs(int(labels[test].sum()) - len(test) / 2) <= 1  # both labels in balance


def test_a_family_without_benign_prompts_needs_a_benign_source() -> None:
    _, labels, attacks, groups = benchmark_mix(mmvet=2, xstest=0)
    with pytest.raises(ValueError, match=r"fold '\w+': .*benign share is empty.*add a benign source"):
        loao_folds(labels, attacks, groups)
    keep = ~np.isin(attacks, ["vqa", "xstest"])
    with pytest.raises(ValueError, match=r"fold 'hades': the held-out family has no benign prompts, and no family"):
        loao_folds(labels[keep], attacks[keep], groups[keep])


def test_transfer_on_a_single_label_mix_borrows_the_benign_pool_on_each_side(monkeypatch) -> None:
    from sahs.experiments import transfer

    features, labels, attacks, groups = benchmark_mix(questions=60, hades=60, mmvet=80, xstest=40)
    fitted_on: list[set[str]] = []
    real = transfer.fit_head_detector

    def spy(features, labels, settings, *, rows, attacks, **kwargs):  # the families of the rows it may read
        fitted_on.append(set(np.asarray(attacks)[np.asarray(rows)]))
        return real(features, labels, settings, rows=rows, attacks=attacks, **kwargs)

    monkeypatch.setattr(transfer, "fit_head_detector", spy)
    result = transfer.transfer_matrix(features, labels, attacks, LoaoSettings(top_k=1), groups=groups)
    assert result.families == ["hades", "sd", "sd_typo", "text", "typo"]  # vqa and xstest: the benign pool
    assert fitted_on == [{family, "vqa", "xstest"} for family in result.families]
    assert result.auroc.min() >= 0.85  # the planted head is shared by every family
    assert all({"asr", "pr"} <= set(cell) for row in result.metrics for cell in row)
