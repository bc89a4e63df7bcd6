"""`sahs locate` and `sahs loao` on a synthetic cache, against direct calls of what they wrap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sahs.cli import main
from sahs.data.cache import ActivationCache
from sahs.eval.loao import leave_one_attack_out
from sahs.models.detectors import LogisticDetector
from tests.synthetic import planted_features, write_cache

PLANTED = [(2, 1), (1, 3)]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("commands")
    features, labels, attacks = planted_features(n=360, layers=3, heads=4, signal_heads=PLANTED, strength=2.5)
    write_cache(root / "cache", features, labels, attacks)
    config = {"seed_everything": 0,
              "trainer": {"default_root_dir": str(root / "run"), "logger": False},
              "model": {"detector": {"class_path": "sahs.models.detectors.LogisticDetector",
                                     "init_args": {"l2": 0.01}}},
              "data": {"cache_dir": str(root / "cache")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_locate_prints_the_planted_heads_first_and_saves_the_ranking(run_config, capsys):
    main(["locate", "--config", str(run_config), "--top_k", "2"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("L0")]
    printed = [(int(line[1:3]), int(line[5:7])) for line in lines]
    assert set(printed) == set(PLANTED)
    saved = run_config.parent / "run" / "locate"
    assert (saved / "head_ranking.json").exists() and (saved / "head_ranking.png").stat().st_size > 0


def test_loao_equals_a_direct_call_and_logs_every_fold(run_config, capsys):
    main(["loao", "--config", str(run_config), "--top_k", "4"])
    out = capsys.readouterr().out
    saved = json.loads((run_config.parent / "run" / "loao" / "loao.json").read_text())
    cache = ActivationCache(yaml.safe_load(run_config.read_text())["data"]["cache_dir"])
    features = cache.read().view(len(cache), 3, 4, -1)
    direct = leave_one_attack_out(features, cache.labels, cache.column("attack"), top_k=4,
                                  detector=LogisticDetector(l2=0.01), seed=0)
    assert saved["auroc_mean"] == pytest.approx(direct.auroc_mean, abs=1e-6)
    assert {fold["attack"] for fold in saved["folds"]} == {"text", "figstep", "template"}
    assert saved["auroc_min"] >= 0.95  # the planted signal is shared by every family
    assert f"loao/auroc_mean={direct.auroc_mean:.4f}" in out


def test_loao_names_the_fold_that_lacks_a_class(tmp_path):
    features, labels, attacks = planted_features(n=60)
    attacks = ["lonely" if y == 1 and i < 20 else a for i, (y, a) in enumerate(zip(labels.tolist(), attacks))]
    write_cache(tmp_path / "cache", features, labels, attacks)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path), "logger": False},
                                      "data": {"cache_dir": str(tmp_path / "cache")}}))
    with pytest.raises(ValueError, match="lonely"):
        main(["loao", "--config", str(config)])


@pytest.mark.parametrize("detector", [
    ["--model.detector=sahs.models.detectors.LogisticDetector"],
    ["--model.detector=sahs.models.detectors.SparseL1Detector", "--model.detector.l1=0.1",
     "--model.detector.group_lasso=true"],
    ["--model.detector=sahs.models.detectors.MLPDetector", "--model.detector.hidden=[16]"],
], ids=["logistic", "group_lasso", "mlp"])
def test_the_detector_is_swapped_from_the_config(run_config, capsys, detector):
    main(["fit", "--config", str(run_config), "--trainer.max_epochs=25", "--trainer.enable_progress_bar=false",
          "--model.lr=0.03", *detector])  # a later --model.lr in `detector` wins
    summary = next(line for line in capsys.readouterr().out.splitlines() if "test/auroc=" in line)
    assert float(summary.split("test/auroc=")[1].split()[0]) >= 0.95
    if "group_lasso" in " ".join(detector):
        active = float(summary.split("val/active_heads=")[1].split()[0])
        assert 1 <= active < 12  # the penalty dropped heads, the planted ones stayed
