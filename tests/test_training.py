"""DataModule and detector module on synthetic caches, checked against independent computations."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from sahs.data.datamodule import ActivationDataModule
from sahs.models.detectors import LogisticDetector, SparseL1Detector
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache


def trainer(epochs: int, **kwargs: object) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def fit(datamodule: ActivationDataModule, epochs: int = 30) -> tuple[DetectorModule, L.Trainer]:
    L.seed_everything(0)  # the detector's initial weights and the batch order
    module = DetectorModule(LogisticDetector(l2=1e-3), lr=0.05)
    runner = trainer(epochs)
    runner.fit(module, datamodule=datamodule)
    return module, runner


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
    aurocs = {}
    for split in ("train", "test"):
        x, y = dm.split_tensors(split)
        with torch.no_grad():
            scores = torch.sigmoid(module(x))
        aurocs[split] = roc_auc_score(y.numpy(), scores.numpy())
        positives = int(y.sum())  # the AUROC's standard deviation for scores unrelated to the labels
        null_sd = math.sqrt((len(y) + 1) / (12 * positives * (len(y) - positives)))
        # Fitted noise on its training rows (far above chance); nothing of it on the unseen test rows.
        assert (aurocs[split] - 0.5 > 4 * null_sd) if split == "train" else (abs(aurocs[split] - 0.5) < 4 * null_sd)
    assert result["test/auroc"] == pytest.approx(aurocs["test"], abs=1e-4)


def test_top_k_keeps_the_planted_heads_ranked_on_train_only(tmp_path, monkeypatch):
    features, labels, attacks = planted_features(n=400, signal_heads=[(1, 2), (2, 0)])
    write_cache(tmp_path, features, labels, attacks)
    seen_rows: list[torch.Tensor] = []
    import sahs.data.rankings as rankings_module

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


class DecayingSGD(DetectorModule):
    """The module with an LR scheduler, as a run config's ``lr_scheduler`` would add one; keeps the batches it saw."""

    def __init__(self, *args: object, momentum: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.momentum = momentum
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append((self.current_epoch, batch[0].clone(), batch[1].clone()))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_sparse_training_is_proximal_sgd_at_each_steps_learning_rate(tmp_path):
    features, labels, attacks = planted_features(n=160, signal_heads=[(1, 2)])
    write_cache(tmp_path, features, labels, attacks)
    datamodule = ActivationDataModule(str(tmp_path), heads=[[1, 2], [0, 1], [2, 3]], batch_size=24)
    datamodule.setup("fit")  # 112 training rows: batches of 24, 24, 24, 24, 16
    L.seed_everything(0)
    l1, lr, accumulate = 0.1, 0.5, 2
    detector = SparseL1Detector(l1=l1, group_lasso=True, head_dim=8)
    detector.build(datamodule.num_features)
    weight, bias = detector.linear.weight.detach().clone(), detector.linear.bias.detach().clone()
    module = DecayingSGD(detector, lr=lr, warm_start=False)  # replayed from its random initialization
    trainer(3, accumulate_grad_batches=accumulate).fit(module, datamodule=datamodule)

    # Replayed by hand: each step averages `accumulate` batches (a short group at the end of an epoch is
    # still divided by `accumulate`, as Lightning does), takes a gradient step, then shrinks every
    # head's block at that step's rate; the rate decays by 0.7 a step.
    mean, std = module.feature_mean, module.feature_std
    for epoch in range(3):
        batches = [(x, y) for e, x, y in module.batches if e == epoch]
        for start in range(0, len(batches), accumulate):
            w, b = weight.requires_grad_(), bias.requires_grad_()
            loss = sum(F.binary_cross_entropy_with_logits(((x - mean) / std) @ w[0] + b, y)
                       for x, y in batches[start:start + accumulate]) / accumulate
            grad_w, grad_b = torch.autograd.grad(loss, [w, b])
            blocks = (w - lr * grad_w).detach().view(-1, 8)  # [heads, head_dim]
            shrink = (1 - lr * l1 * math.sqrt(8) / blocks.norm(dim=1, keepdim=True)).clamp_min(0)
            weight, bias = (blocks * shrink).view(1, -1), (b - lr * grad_b).detach()
            lr *= 0.7
    assert len(module.batches) == 15
    torch.testing.assert_close(module.detector.linear.weight.detach(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.detector.linear.bias.detach(), bias, rtol=1e-5, atol=1e-6)
    assert (weight.view(-1, 8).norm(dim=1) == 0).any()  # a head was dropped: the shrinkage did work


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: DetectorModule(d, optimizer="adam"), r"SparseL1Detector's proximal step needs plain SGD, got Adam"),
        (lambda d: DecayingSGD(d, momentum=0.9), r"needs SGD without momentum, got momentum=0.9"),
    ],
    ids=["adam", "momentum"],
)
def test_sparse_training_refuses_optimizers_its_proximal_step_does_not_fit(tmp_path, make, message):
    features, labels, attacks = planted_features(n=60)
    write_cache(tmp_path, features, labels, attacks)
    module = make(SparseL1Detector(l1=1e-3))
    with pytest.raises(ValueError, match=message + r".*model\.optimizer: sgd"):
        trainer(1).fit(module, datamodule=ActivationDataModule(str(tmp_path)))
