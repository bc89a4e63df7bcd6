"""DataModule and detector module on synthetic caches, checked against independent computations."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sahs.data.datamodule import ActivationDataModule
from sahs.models.detectors import LogisticDetector
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache


def fit(datamodule: ActivationDataModule, epochs: int = 30) -> tuple[DetectorModule, L.Trainer]:
    module = DetectorModule(LogisticDetector(l2=1e-3), lr=0.05)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_datamodule_reads_the_selected_heads_and_splits_by_label_and_attack(tmp_path):
    features, labels, attacks = planted_features(n=300)
    write_cache(tmp_path, features, labels, attacks, shard_size=70)
    dm = ActivationDataModule(str(tmp_path), heads=[[2, 1], [0, 3]], val_fraction=0.2, test_fraction=0.2, seed=3)
    dm.setup("fit")
    torch.testing.assert_close(dm.features, torch.cat([features[:, 2, 1], features[:, 0, 3]], dim=1))
    parts = [set(dm.splits[s].tolist()) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(range(300)) and sum(map(len, parts)) == 300
    for split in ("val", "test"):
        index = dm.splits[split]
        for stratum in {(int(labels[i]), attacks[i]) for i in range(300)}:
            count = sum((int(labels[i]), attacks[i]) == stratum for i in index.tolist())
            assert count == 10, (split, stratum, count)  # 50 a stratum, 20% each
    again = ActivationDataModule(str(tmp_path), heads=[[2, 1], [0, 3]], val_fraction=0.2, test_fraction=0.2, seed=3)
    again.setup("fit")
    assert all(torch.equal(again.splits[s], dm.splits[s]) for s in dm.splits)


def test_layers_select_every_head_of_those_layers(tmp_path):
    features, labels, attacks = planted_features(n=40)
    write_cache(tmp_path, features, labels, attacks)
    dm = ActivationDataModule(str(tmp_path), layers=[1])
    dm.setup("fit")
    torch.testing.assert_close(dm.features, features[:, 1].flatten(1))


def test_logistic_detector_finds_a_planted_head(tmp_path):
    features, labels, attacks = planted_features(n=400, signal_heads=[(1, 2)])
    write_cache(tmp_path, features, labels, attacks)
    dm = ActivationDataModule(str(tmp_path), batch_size=32)
    module, trainer = fit(dm)
    x_train, _ = dm.split_tensors("train")
    torch.testing.assert_close(module.feature_mean, x_train.mean(0))  # scaling fitted on train only
    x_test, y_test = dm.split_tensors("test")
    with torch.no_grad():
        scores = torch.sigmoid(module(x_test))
    assert roc_auc_score(y_test.numpy(), scores.numpy()) >= 0.99
    (result,) = trainer.test(module, datamodule=dm, verbose=False)
    assert result["test/auroc"] == pytest.approx(roc_auc_score(y_test.numpy(), scores.numpy()), abs=1e-4)


def test_logistic_detector_is_at_chance_on_shuffled_labels(tmp_path):
    features, labels, attacks = planted_features(n=600, signal_heads=[(1, 2)])
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    write_cache(tmp_path, features, shuffled, attacks)
    dm = ActivationDataModule(str(tmp_path), batch_size=64)
    module, trainer = fit(dm, epochs=15)
    (result,) = trainer.test(module, datamodule=dm, verbose=False)
    assert abs(result["test/auroc"] - 0.5) < 0.12


def test_top_k_keeps_the_planted_heads_ranked_on_train_only(tmp_path, monkeypatch):
    features, labels, attacks = planted_features(n=400, signal_heads=[(1, 2), (2, 0)])
    write_cache(tmp_path, features, labels, attacks)
    seen_rows: list[torch.Tensor] = []
    import sahs.experiments.rankings as rankings_module

    real = rankings_module.rank_heads
    monkeypatch.setattr(rankings_module, "rank_heads",
                        lambda x, y, **kw: (seen_rows.append(kw["rows"]), real(x, y, **kw))[1])
    dm = ActivationDataModule(str(tmp_path), top_k=2)
    dm.setup("fit")
    assert set(dm.selected_heads) == {(1, 2), (2, 0)}
    assert len(seen_rows) == 1 and torch.equal(seen_rows[0], dm.splits["train"])
    torch.testing.assert_close(dm.features, torch.cat([features[:, l, h] for l, h in dm.selected_heads], dim=1))


def test_asr_and_pr_use_the_threshold_chosen_on_validation(tmp_path):
    features, labels, attacks = planted_features(n=400, signal_heads=[(1, 2)], strength=1.5)
    write_cache(tmp_path, features, labels, attacks)
    dm = ActivationDataModule(str(tmp_path), batch_size=32)
    module, trainer = fit(dm, epochs=10)
    (result,) = trainer.test(module, datamodule=dm, verbose=False)
    with torch.no_grad():
        val_scores, val_y = (torch.sigmoid(module(dm.split_tensors("val")[0])), dm.split_tensors("val")[1])
        test_scores, test_y = (torch.sigmoid(module(dm.split_tensors("test")[0])), dm.split_tensors("test")[1])
    # Independently: the highest threshold that still flags 95% of the malicious validation prompts.
    malicious = val_scores[val_y == 1].sort(descending=True).values
    threshold = malicious[int(torch.ceil(torch.tensor(0.95 * len(malicious)))) - 1]
    assert float(module.threshold) == pytest.approx(float(threshold))
    assert result["test/asr"] == pytest.approx(float((test_scores[test_y == 1] < threshold).float().mean()))
    assert result["test/pr"] == pytest.approx(float((test_scores[test_y == 0] < threshold).float().mean()))
