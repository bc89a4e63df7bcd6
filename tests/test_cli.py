"""The real `sahs` command on a trimmed demo config, and every shipped config parses and builds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from sahs.cli import SahsCLI, main
from sahs.data.cache import ActivationCache
from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def trimmed_demo(tmp_path: Path, **logger: object) -> Path:
    """configs/demo.yaml with fewer prompts and epochs, writing under tmp_path."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"].update(max_epochs=8, default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)
    if logger:
        config["trainer"]["logger"] = logger
    extraction = config["trainer"]["callbacks"][0]["init_args"]
    extraction["prompts"]["init_args"].update(n_benign=36, n_malicious=36, image_size=64)
    extraction["progress"] = False
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_fits_end_to_end_and_reports_the_auroc_it_logged(tmp_path, capsys):
    config = trimmed_demo(tmp_path)
    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    assert "activation cache built" in out
    summary = next(line for line in out.splitlines() if line.startswith("[sahs] ") and "test/auroc=" in line)
    reported = float(summary.split("test/auroc=")[1].split()[0])

    # Independent check: the best checkpoint's scores on the test split, through scikit-learn.
    best = next((tmp_path / "run").rglob("best-*.ckpt"))
    datamodule = ActivationDataModule(str(tmp_path / "cache"))
    datamodule.setup("test")
    module = DetectorModule(yaml_detector(config))
    module.detector.build(datamodule.num_features)
    module.load_state_dict(torch.load(best, weights_only=False)["state_dict"])
    x, y = datamodule.split_tensors("test")
    with torch.no_grad():
        scores = torch.sigmoid(module(x))
    assert reported == pytest.approx(roc_auc_score(y.numpy(), scores.numpy()), abs=1e-3)

    metrics_csv = next((tmp_path / "run").rglob("metrics.csv"))
    columns = next(csv.reader(metrics_csv.open()))
    assert {"train/loss", "val/auroc", "val/auprc", "val/acc@0.5", "val/acc@thr", "test/auroc"} <= set(columns)

    main(["fit", "--config", str(config)])  # same config: the cache is reused, no model forward
    assert "activation cache reused" in capsys.readouterr().out


def yaml_detector(config: Path):
    from sahs.models.detectors import LogisticDetector

    spec = yaml.safe_load(config.read_text())["model"]["detector"]
    assert spec["class_path"].endswith("LogisticDetector")
    return LogisticDetector(**spec["init_args"])


def test_wandb_offline_logging_works_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = trimmed_demo(tmp_path, class_path="lightning.pytorch.loggers.WandbLogger",
                          init_args={"offline": True, "save_dir": str(tmp_path / "wandb"), "project": "sahs-test"})
    main(["fit", "--config", str(config), "--trainer.max_epochs=2"])
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    assert any(path.suffix == ".wandb" and path.stat().st_size > 0 for path in runs[0].iterdir())


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config):
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                  args=["--config", str(config), "--trainer.logger=false"])
    assert isinstance(cli.model, DetectorModule) and isinstance(cli.datamodule, ActivationDataModule)
    extraction = [c for c in cli.trainer.callbacks if type(c).__name__ == "ActivationExtraction"]
    assert len(extraction) == 1
    raw = yaml.safe_load(config.read_text())
    assert extraction[0].model.name == raw["trainer"]["callbacks"][0]["init_args"]["model"]["name"]


def test_llava_config_prints_without_downloading(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "llava.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["trainer"]["callbacks"][0]["init_args"]["model"]
    assert model["name"] == "llava-hf/llava-1.5-7b-hf" and model["dtype"] == "float16"
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "outputs/llava-1.5-7b"  # interpolated


def test_a_config_typo_names_the_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--data.cache_dri=x"])
    assert "cache_dri" in capsys.readouterr().err


def test_extract_verb_writes_the_cache_that_fit_reuses(tmp_path, capsys):
    config = trimmed_demo(tmp_path)
    main(["extract", "--config", str(config)])
    assert "activation cache built" in capsys.readouterr().out
    by_trainer = ActivationCache(tmp_path / "cache")

    # The fit-time callback's own path into another folder gives the same rows and values.
    main(["fit", "--config", str(config), f"--data.cache_dir={tmp_path / 'again'}", "--trainer.max_epochs=1"])
    by_callback = ActivationCache(tmp_path / "again")
    assert by_trainer.fingerprint == by_callback.fingerprint
    assert by_trainer.column("id") == by_callback.column("id")
    torch.testing.assert_close(by_trainer.read(), by_callback.read(), atol=1e-3, rtol=1e-3)

    main(["fit", "--config", str(config), "--trainer.max_epochs=1"])
    assert "activation cache reused" in capsys.readouterr().out
