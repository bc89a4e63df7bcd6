"""`sahs fit`'s minibatch path reaches the full-batch optimum, reacts to its settings, and reports like fit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from sklearn.metrics import roc_auc_score

from sahs.cli import main
from sahs.data.datamodule import ActivationDataModule
from sahs.models.detectors import Detector, LogisticDetector, MLPDetector, SparseL1Detector
from sahs.models.module import DetectorModule, TrainingConfigError
from tests.synthetic import planted_features, write_cache
from tests.test_cli import organism, trimmed_demo  # noqa: F401 (organism: a fixture)

ROOT = Path(__file__).resolve().parents[1]
SPEC = 0.005  # the promise: the minibatch path's AUROC within this of the full-batch fit on the same rows


def full_batch(datamodule: ActivationDataModule, detector: Detector) -> tuple[Detector, dict[str, float]]:
    """``Detector.fit`` on the standardized training split, seeded as the run is; AUROC by scikit-learn."""
    x, y = datamodule.split_tensors("train")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    L.seed_everything(0)
    detector.fit((x - mean) / std, y)
    aurocs = {}
    for split in ("val", "test"):
        xs, ys = datamodule.split_tensors(split)
        aurocs[split] = roc_auc_score(ys.numpy(), detector.decision_function((xs - mean) / std).numpy())
    return detector, aurocs


def synthetic(tmp_path: Path) -> ActivationDataModule:
    features, labels, attacks = planted_features(n=300, signal_heads=[(1, 2), (2, 0)], strength=1.0)
    write_cache(tmp_path, features, labels, attacks)
    datamodule = ActivationDataModule(str(tmp_path), batch_size=32)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("make", [lambda: LogisticDetector(l2=1e-3), lambda: SparseL1Detector(l1=1e-2),
                                  lambda: MLPDetector(hidden=[16], dropout=0.0, l2=1e-2)],
                         ids=["logistic", "sparse_l1", "mlp"])
def test_the_best_checkpoint_scores_like_the_full_batch_fit(tmp_path, make):
    datamodule = synthetic(tmp_path / "cache")
    reference, expected = full_batch(datamodule, make())
    L.seed_everything(0)
    module = DetectorModule(make(), lr=0.25 / datamodule.num_features)  # the shipped configs' rule
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auroc", mode="max", filename="e{epoch}",
                                 auto_insert_metric_name=False, save_top_k=-1)
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[checkpoint, EarlyStopping("val/auroc", mode="max", patience=5)])
    trainer.fit(module, datamodule=datamodule)

    # Epoch 0 is the full-batch solution itself: its steps were taken at learning rate 0.
    epoch0 = torch.load(tmp_path / "ckpt" / "e0.ckpt", weights_only=False)["state_dict"]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(epoch0[f"detector.{name}"], value)
    (val,) = trainer.validate(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    (test,) = trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    assert val["val/auroc"] >= expected["val"] - 1e-6  # the warm start is a candidate (1e-6: logged in float32)
    assert val["val/auroc"] == pytest.approx(expected["val"], abs=SPEC)
    assert test["test/auroc"] == pytest.approx(expected["test"], abs=SPEC)


def test_epoch_zero_steps_at_rate_zero_then_the_rate_decays_by_a_cosine():
    module = DetectorModule(LogisticDetector(), lr=0.1)
    module._trainer = L.Trainer(max_epochs=5, logger=False, enable_progress_bar=False)
    factors = [module.lr_factor(epoch) for epoch in range(5)]
    assert factors == pytest.approx([0.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    cold = DetectorModule(LogisticDetector(), warm_start=False, schedule="constant")
    assert [cold.lr_factor(epoch) for epoch in range(3)] == [1.0, 1.0, 1.0]


def test_rank_figures_come_from_logits_where_probabilities_saturate(tmp_path):
    datamodule = synthetic(tmp_path)
    module = DetectorModule(LogisticDetector(l2=1e-3), warm_start=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    with torch.no_grad():
        module.detector.linear.weight.mul_(1e3)  # logits of thousands: float32 sigmoid ties them all at 0 or 1
    (result,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    x, y = datamodule.split_tensors("val")
    with torch.no_grad():
        logits = module(x)
    assert (torch.sigmoid(logits) == 1).sum() > 1  # ties that a probability-based AUROC would count as 1/2
    assert result["val/auroc"] == pytest.approx(roc_auc_score(y.numpy(), logits.numpy()), abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(weight_decay=0.01), r"model.weight_decay=0.01 and the detector's l2=0.001 both regularize"),
    (dict(weight_decay=0.01, detector=LogisticDetector(l2=0.0)), r"not part of the objective the warm start fits"),
], ids=["beside_l2", "with_warm_start"])
def test_one_regularizer_only(tmp_path, settings, message):
    datamodule = synthetic(tmp_path)
    module = DetectorModule(**{"detector": LogisticDetector(l2=1e-3), **settings})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(TrainingConfigError, match=message):
        trainer.fit(module, datamodule=datamodule)


@pytest.mark.parametrize("verb", ["validate", "test"])
def test_validate_and_test_without_a_checkpoint_are_refused(tmp_path, capsys, verb):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--config", str(ROOT / "configs" / "demo.yaml"), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sahs: error: sahs {verb} scores a trained detector: give --ckpt_path "
                   "(e.g. <run folder>/checkpoints/best-<epoch>.ckpt from `sahs fit`)"]
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def figures(out: str) -> dict[str, float]:
    """The ``[sahs] name=value ...`` summary line of a run's output."""
    line = next(line for line in out.splitlines() if line.startswith("[sahs] ") and "/auroc=" in line)
    return {name: float(value) for name, value in (cell.split("=") for cell in line.removeprefix("[sahs] ").split())}


def test_demo_l2_settings_change_the_weights_and_each_matches_its_full_batch_fit(tmp_path, capsys, organism):
    config = trimmed_demo(tmp_path)
    fitted = {}
    for l2 in (1e-3, 1e-1):
        main(["fit", "--config", str(config), f"--model.detector.l2={l2}", f"--run.name=l2-{l2}"])
        printed = figures(capsys.readouterr().out)
        run = tmp_path / "run" / "fit" / f"l2-{l2}"
        (best,) = (run / "checkpoints").glob("best-*.ckpt")
        assert printed["best_epoch"] == int(best.stem.split("-")[1])
        (logged,) = [row for row in csv.DictReader(next(run.rglob("metrics.csv")).open()) if row["best_epoch"]]
        assert float(logged["best_epoch"]) == printed["best_epoch"]
        datamodule = ActivationDataModule(str(tmp_path / "cache"))
        datamodule.setup("fit")
        _, expected = full_batch(datamodule, LogisticDetector(l2=l2))
        assert printed["val/auroc"] == pytest.approx(expected["val"], abs=SPEC)
        assert printed["test/auroc"] == pytest.approx(expected["test"], abs=SPEC)
        fitted[l2] = torch.load(best, weights_only=False)["state_dict"]["detector.linear.weight"]

        # validate with the checkpoint prints the same summary as fit, not Lightning's table.
        main(["validate", "--config", str(config), f"--ckpt_path={best}", f"--run.name=val-{l2}"])
        out = capsys.readouterr().out
        assert "Validate metric" not in out and "val by attack family" in out
        assert figures(out)["val/auroc"] == printed["val/auroc"] and figures(out)["epoch"] == printed["best_epoch"]
    # 100x the penalty: other weights, and smaller ones.
    assert fitted[1e-1].norm() < 0.5 * fitted[1e-3].norm()
