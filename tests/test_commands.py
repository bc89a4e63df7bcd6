"""`sahs locate` and `sahs loao` on a synthetic cache, against direct calls of what they wrap."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from sahs.cli import lightning_main, main
from sahs.data.cache import ActivationCache
from sahs.data.datamodule import ActivationDataModule
from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out
from sahs.models.detectors import LogisticDetector, MLPDetector, SparseL1Detector
from tests.run_folders import newest_run
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
    saved = newest_run(run_config.parent / "run", "locate")
    assert (saved / "head_ranking.json").exists() and (saved / "head_ranking.png").stat().st_size > 0


def test_loao_equals_a_direct_call_and_logs_every_fold(run_config, capsys):
    main(["loao", "--config", str(run_config), "--top_k", "4"])
    out = capsys.readouterr().out
    saved = json.loads((newest_run(run_config.parent / "run", "loao") / "loao.json").read_text())
    cache = ActivationCache(yaml.safe_load(run_config.read_text())["data"]["cache_dir"])
    features = cache.read().view(len(cache), 3, 4, -1)
    direct = leave_one_attack_out(features, cache.labels, cache.column("attack"),
                                  LoaoSettings(top_k=4, detector=LogisticDetector(l2=0.01), seed=0))
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
        main(["loao", "--config", str(config), "--top_k", "4"])
    assert not any((tmp_path / "loao").iterdir())  # the failed run left no folder that looks like a run


@pytest.mark.parametrize("detector, expected", [
    (["--model.detector=sahs.models.detectors.LogisticDetector"], LogisticDetector(l2=0.01)),
    (["--model.detector=sahs.models.detectors.SparseL1Detector", "--model.detector.l1=0.1",
      "--model.detector.group_lasso=true"], SparseL1Detector(l1=0.1, group_lasso=True, head_dim=8)),
    (["--model.detector=sahs.models.detectors.MLPDetector", "--model.detector.hidden=[16]"],
     MLPDetector(hidden=[16], l2=0.01)),  # the config's l2 carries over to the swapped class
], ids=["logistic", "group_lasso", "mlp"])
def test_the_detector_is_swapped_from_the_config(run_config, capsys, detector, expected):
    cli = lightning_main(["fit", "--config", str(run_config), "--trainer.max_epochs=25",
                          "--trainer.enable_progress_bar=false", "--model.lr=0.03", *detector])
    trained = cli.model.detector
    assert type(trained) is type(expected) and trained.get_params() == expected.get_params()
    # The printed figure is the trained module's own (the best checkpoint, which `test` loaded into it).
    summary = next(line for line in capsys.readouterr().out.splitlines() if "test/auroc=" in line)
    x, y = cli.datamodule.split_tensors("test")
    with torch.no_grad():
        scores = torch.sigmoid(cli.model(x))
    reported = float(summary.split("test/auroc=")[1].split()[0])
    assert reported == pytest.approx(roc_auc_score(y.numpy(), scores.numpy()), abs=1e-4) and reported >= 0.95
    if isinstance(expected, SparseL1Detector):
        active = float(summary.split("val/active_heads=")[1].split()[0])
        assert active == trained.active_heads() and 1 <= active < 12  # the penalty dropped heads, not the planted ones
        kept = {cli.datamodule.selected_heads[h] for h in trained.head_norms().nonzero().flatten().tolist()}
        assert set(PLANTED) <= kept


def _printed_heads(out: str) -> list[tuple[int, int]]:
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("L") and ".H" in line]
    return [(int(line[1:3]), int(line[5:7])) for line in lines]


@pytest.mark.parametrize("selection", [["--data.layers", "[1, 2]"], ["--data.layers", "[1, 2]", "--data.top_k", "2"],
                                       ["--data.heads", "[[0, 0], [2, 1]]"]], ids=["layers", "top_k", "heads"])
def test_a_head_planted_at_model_layer_2_is_named_layer_2_everywhere(tmp_path, capsys, selection):
    features, labels, attacks = planted_features(n=240, layers=3, heads=4, signal_heads=[(2, 1)], strength=3.0)
    write_cache(tmp_path / "cache", features, labels, attacks)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False},
                                      "data": {"cache_dir": str(tmp_path / "cache")}}))
    main(["locate", "--config", str(config), "--top_k", "1", *selection])
    assert _printed_heads(capsys.readouterr().out) == [(2, 1)]
    saved = json.loads((newest_run(tmp_path / "run", "locate") / "head_ranking.json").read_text())
    assert 2 in saved["layers"]
    main(["loao", "--config", str(config), "--top_k", "1", *selection])
    capsys.readouterr()
    folds = json.loads((newest_run(tmp_path / "run", "loao") / "loao.json").read_text())["folds"]
    assert all(fold["heads"] == [[2, 1]] for fold in folds)


def test_fit_with_a_layer_subset_selects_and_saves_model_layers(tmp_path, capsys):
    features, labels, attacks = planted_features(n=240, layers=3, heads=4, signal_heads=[(2, 1)], strength=3.0)
    write_cache(tmp_path / "cache", features, labels, attacks)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path / "run"), "max_epochs": 2,
                                                  "enable_progress_bar": False},
                                      "data": {"cache_dir": str(tmp_path / "cache"), "layers": [1, 2], "top_k": 1}}))
    main(["fit", "--config", str(config)])
    summary = next(line for line in capsys.readouterr().out.splitlines() if "test/auroc=" in line)
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("head_ranking.csv")).open()))
    # Every head of model layers 1 and 2 (none of layer 0), best first, the planted one on top.
    assert sorted((int(r["layer"]), int(r["head"])) for r in rows) == [(l, h) for l in (1, 2) for h in range(4)]
    assert [float(r["auroc"]) for r in rows] == sorted((float(r["auroc"]) for r in rows), reverse=True)
    assert (rows[0]["layer"], rows[0]["head"]) == ("2", "1")
    # The checkpoint holds model layer 2's head 1, and scoring the cache's raw activations of that head
    # by hand with its weights gives the test AUROC the run printed.
    saved = torch.load(next((tmp_path / "run").rglob("checkpoints/*.ckpt")), weights_only=True)
    assert [tuple(pair) for pair in saved["sahs"]["features"]["heads"]] == [(2, 1)]
    state = saved["state_dict"]
    z = (features[:, 2, 1] - state["feature_mean"]) / state["feature_std"]
    scores = z @ state["detector.linear.weight"][0] + state["detector.linear.bias"][0]
    datamodule = ActivationDataModule(str(tmp_path / "cache"))
    datamodule.setup("test")
    test = datamodule.splits["test"]
    reported = float(summary.split("test/auroc=")[1].split()[0])
    assert reported == pytest.approx(roc_auc_score(labels[test].numpy(), scores[test].numpy()), abs=1e-4)


def test_a_verbs_options_come_from_its_config_section_and_every_verb_is_listed(run_config, tmp_path, capsys):
    from sahs.cli import LIGHTNING_VERBS
    from sahs.commands import VERBS

    config = yaml.safe_load(run_config.read_text())
    config["loao"] = {"top_k": 1}
    config["run"] = {"name": "from_section"}
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / "with_section.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["loao", "--config", str(path)])
    folds = json.loads((tmp_path / "loao" / "from_section" / "loao.json").read_text())["folds"]
    assert all(len(fold["heads"]) == 1 for fold in folds)
    main(["loao", "--config", str(path), "--loao.top_k", "3"])  # the command line overrides the section
    folds = json.loads((tmp_path / "loao" / "from_section-2" / "loao.json").read_text())["folds"]
    assert all(len(fold["heads"]) == 3 for fold in folds)  # in a folder of its own: the first run is kept
    assert len(json.loads((tmp_path / "loao" / "from_section" / "loao.json").read_text())["folds"][0]["heads"]) == 1
    capsys.readouterr()
    main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [*LIGHTNING_VERBS, *VERBS]
