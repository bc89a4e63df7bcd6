"""Per-family figures in fit/validate/test: each equals scikit-learn on that family's rows."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from sahs.cli import main
from sahs.data.datamodule import ActivationDataModule
from sahs.models.detectors import LogisticDetector
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache


def mixed_cache(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two families with both labels, a malicious-only one ("hades") and a benign-only one ("vqa")."""
    features, labels, attacks = planted_features(n=480, signal_heads=[(1, 2)], strength=1.2,
                                                 attacks=("text", "figstep", "single"))
    attacks = [("hades" if y == 1 else "vqa") if a == "single" else a for a, y in zip(attacks, labels.tolist())]
    write_cache(root, features, labels, attacks)
    return features, labels, attacks


def test_per_family_auroc_asr_and_pr_equal_sklearn_on_the_familys_rows(tmp_path) -> None:
    _, _, attacks = mixed_cache(tmp_path)
    datamodule = ActivationDataModule(str(tmp_path), batch_size=32, seed=2)
    module = DetectorModule(LogisticDetector(l2=1e-3), lr=0.05)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    (validated,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
    threshold = float(module.threshold)
    for stage, result in (("val", validated), ("test", tested)):
        rows = datamodule.splits[stage].numpy()
        x, y = datamodule.split_tensors(stage)
        with torch.no_grad():
            scores = torch.sigmoid(module(x)).numpy()
        y, family = y.numpy(), np.asarray(attacks)[rows]
        for name in ("text", "figstep"):  # both labels: the family's own rows
            mine = family == name
            assert result[f"{stage}/auroc/{name}"] == pytest.approx(roc_auc_score(y[mine], scores[mine]), abs=1e-6)
        # Malicious only: against every benign row of the split.
        versus = (family == "hades") | (y == 0)
        assert result[f"{stage}/auroc/hades"] == pytest.approx(roc_auc_score(y[versus], scores[versus]), abs=1e-6)
        assert f"{stage}/auroc/vqa" not in result and f"{stage}/asr/vqa" not in result
        assert f"{stage}/pr/hades" not in result
        for name in ("text", "figstep", "hades"):
            malicious = (family == name) & (y == 1)
            assert result[f"{stage}/asr/{name}"] == pytest.approx(float(np.mean(scores[malicious] < threshold)))
        for name in ("text", "figstep", "vqa"):
            benign = (family == name) & (y == 0)
            assert result[f"{stage}/pr/{name}"] == pytest.approx(float(np.mean(scores[benign] < threshold)))


def test_fit_prints_and_logs_the_per_family_figures(tmp_path, capsys) -> None:
    mixed_cache(tmp_path / "cache")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_epochs": 3, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "run"), "name": "logs"}}},
        "data": {"cache_dir": str(tmp_path / "cache")}}))
    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out.splitlines()
    start = out.index("[sahs] test by attack family (ASR and PR at the validation threshold):")
    printed = {line.split()[0]: dict(cell.split("=") for cell in line.split()[1:] if "=" in cell and
                                     not cell.endswith("="))
               for line in out[start + 1:start + 5]}
    assert set(printed) == {"figstep", "hades", "text", "vqa"}
    with next((tmp_path / "run").rglob("metrics.csv")).open() as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("test/auroc/text")]
    assert len(logged) == 1
    for family, cells in printed.items():
        for metric, value in cells.items():
            assert float(value) == pytest.approx(float(logged[0][f"test/{metric}/{family}"]), abs=1e-4)
    assert "auroc" not in printed["vqa"] and "pr" not in printed["hades"]
