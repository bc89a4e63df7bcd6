"""Every run has its own folder under the root the command line names, its full config, and a W&B identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sahs.cli import main
from tests.run_folders import newest_run
from tests.synthetic import planted_features, write_cache
from tests.wandb_records import offline_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    features, labels, attacks = planted_features(n=120, layers=3, heads=4, signal_heads=[(2, 1)], strength=2.5)
    write_cache(root / "cache", features, labels, attacks)
    return root / "cache"


def run_config(folder: Path, cache: Path, logger: dict) -> Path:
    config = {"seed_everything": 0,
              "trainer": {"default_root_dir": str(folder / "from_yaml"), "max_epochs": 2, "enable_progress_bar": False,
                          "logger": logger,
                          "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"monitor": "val/auroc", "mode": "max"}}]},
              "model": {"detector": {"class_path": "sahs.models.detectors.LogisticDetector", "init_args": {"l2": 0.01}}},
              "data": {"cache_dir": str(cache), "top_k": 2}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_command_line_root_moves_every_output_and_no_run_overwrites_another(tmp_path, cache, capsys):
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "logs"}}
    config = run_config(tmp_path, cache, csv_logger)
    root = tmp_path / "from_command_line"
    for verb in ("fit", "fit", "loao", "locate"):
        main([verb, "--config", str(config), f"--trainer.default_root_dir={root}"])
    capsys.readouterr()
    assert not (tmp_path / "from_yaml").exists()  # nothing went where the YAML's root points
    assert sorted(p.name for p in root.iterdir()) == ["fit", "loao", "locate"]
    fits = sorted((root / "fit").iterdir())
    assert len(fits) == 2  # two runs, two folders
    for folder in fits:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["trainer"]["default_root_dir"] == str(root)
        assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(root)  # ${...} resolved after the override
        assert (folder / "metrics.csv").is_file() and (folder / "head_ranking.json").is_file()
        assert len(list((folder / "checkpoints").glob("*.ckpt"))) == 1
    loao = newest_run(root, "loao")
    assert {"config.yaml", "loao.json", "loao.csv", "metrics.json", "metrics.csv"} <= {p.name for p in loao.iterdir()}
    locate = newest_run(root, "locate")
    assert {"config.yaml", "head_ranking.json", "head_ranking.csv", "head_ranking.png"} <= {p.name for p in locate.iterdir()}


def test_runs_carry_name_group_job_type_tags_and_full_config_to_w_and_b(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "sahs-test", "offline": True, "save_dir": "${trainer.default_root_dir}"}}
    config = run_config(tmp_path, cache, wandb_logger)
    main(["loao", "--config", str(config), "--top_k", "3", "--run.group=study", "--run.tags=[first]"])
    main(["fit", "--config", str(config), "--run.name=baseline"])
    capsys.readouterr()
    loao = newest_run(tmp_path / "from_yaml", "loao")
    logged = offline_run(loao)
    assert logged["name"] == loao.name and logged["group"] == "study" and logged["job_type"] == "loao"
    assert {"loao", "LogisticDetector", "first"} <= set(logged["tags"])
    assert logged["config"]["model"]["detector"] == {"class_path": "sahs.models.detectors.LogisticDetector",
                                                     "init_args": {"l2": 0.01}}
    assert logged["config"]["loao"]["top_k"] == 3
    results = json.loads((loao / "metrics.json").read_text())
    assert logged["logged"]["loao/auroc_mean"] == pytest.approx(results["loao/auroc_mean"], abs=1e-12)

    fit = tmp_path / "from_yaml" / "fit" / "baseline"
    logged = offline_run(fit)
    assert logged["name"] == "baseline" and logged["group"] == "run" and logged["job_type"] == "fit"
    assert logged["config"]["data"]["top_k"] == 2 and logged["config"]["model"]["detector"]["init_args"]["l2"] == 0.01
    assert (fit / "checkpoints").is_dir() and (fit / "config.yaml").is_file()
