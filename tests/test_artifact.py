"""Self-contained checkpoints, `sahs predict` files and `sahs export` folders, on a synthetic cache.

Scores are recomputed by hand from the checkpoint's raw state dict and the cache's raw activations;
AUROC by scikit-learn against the figure `sahs fit` reported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import wandb
import yaml
from sklearn.metrics import roc_auc_score

from sahs.cli import main
from sahs.data.cache import ActivationCache, CacheMismatchError
from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache
from tests.run_folders import newest_run

PLANTED = [(2, 1), (1, 3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A top_k=2 detector fitted by `sahs fit`: (config without top_k, checkpoint, reported test AUROC)."""
    root = tmp_path_factory.mktemp("artifact")
    features, labels, attacks = planted_features(n=300, layers=3, heads=4, signal_heads=PLANTED, strength=1.2)
    write_cache(root / "cache", features, labels, attacks)
    write_cache(root / "other", features, labels, attacks, model="other-model")
    config = {"seed_everything": 0,
              "trainer": {"default_root_dir": str(root / "run"), "logger": False, "max_epochs": 6,
                          "enable_progress_bar": False, "enable_model_summary": False},
              "model": {"detector": {"class_path": "sahs.models.detectors.LogisticDetector",
                                     "init_args": {"l2": 0.01}}},
              "data": {"cache_dir": str(root / "cache")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


@pytest.fixture(scope="module")
def fitted(trained):
    root, config = trained
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        main(["fit", "--config", str(config), "--data.top_k", "2"])
    summary = next(line for line in out.getvalue().splitlines() if "test/auroc=" in line)
    checkpoint = next((root / "run").rglob("*.ckpt"))
    return config, checkpoint, float(summary.split("test/auroc=")[1].split()[0])


def scores_by_hand(checkpoint: Path, cache_dir: Path) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Stored heads and every prompt's score: raw state dict, raw activations, logistic regression by hand."""
    saved = torch.load(checkpoint, weights_only=True)
    heads = [tuple(pair) for pair in saved["sahs"]["features"]["heads"]]
    state = saved["state_dict"]
    x = ActivationCache(cache_dir).read(heads).flatten(1)
    z = (x - state["feature_mean"]) / state["feature_std"]
    return heads, torch.sigmoid(z @ state["detector.linear.weight"][0] + state["detector.linear.bias"][0])


def test_checkpoint_keeps_the_ranked_heads_and_predict_uses_them_without_top_k(fitted, tmp_path):
    config, checkpoint, reported_auroc = fitted
    cache_dir = Path(yaml.safe_load(config.read_text())["data"]["cache_dir"])
    heads, expected = scores_by_hand(checkpoint, cache_dir)
    assert set(heads) == set(PLANTED)

    out = tmp_path / "test.csv"
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint), "--data.predict_split", "test",
          "--predictions.output", str(out)])
    table = pd.read_csv(out)
    datamodule = ActivationDataModule(str(cache_dir), seed=0)
    datamodule.setup("test")
    test_rows = datamodule.splits["test"].tolist()
    cache = ActivationCache(cache_dir)
    assert table["id"].tolist() == [cache.column("id")[row] for row in test_rows]  # one row per test prompt
    assert table["label"].tolist() == [cache.column("label")[row] for row in test_rows]
    assert set(table["split"]) == {"test"}
    torch.testing.assert_close(torch.tensor(table["score"].to_numpy()), expected[test_rows].double(),
                               atol=1e-5, rtol=1e-5)
    assert roc_auc_score(table["label"], table["score"]) == pytest.approx(reported_auroc, abs=1e-4)
    threshold = float(torch.load(checkpoint, weights_only=True)["state_dict"]["threshold"])
    assert table["flagged"].tolist() == (table["score"] >= threshold).tolist()


def test_predict_writes_parquet_for_the_whole_cache_in_the_run_folder(fitted):
    config, checkpoint, _ = fitted
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint), "--predictions.format", "parquet"])
    table = pd.read_parquet(newest_run(config.parent / "run", "predict") / "predictions.parquet")  # its own folder
    cache = ActivationCache(config.parent / "cache")
    assert table["id"].tolist() == cache.column("id")
    assert list(table.columns) == ["id", "score", "flagged", "label", "attack", "source", "split"]
    datamodule = ActivationDataModule(str(config.parent / "cache"), seed=0)
    datamodule.setup("predict")
    for name, rows in datamodule.splits.items():
        assert (table["split"] == name).to_numpy().nonzero()[0].tolist() == rows.tolist()


def test_load_from_checkpoint_needs_no_config(fitted):
    config, checkpoint, _ = fitted
    heads, expected = scores_by_hand(checkpoint, config.parent / "cache")
    module = DetectorModule.load_from_checkpoint(checkpoint)
    assert module.feature_selection.heads == heads
    with torch.no_grad():
        scores = torch.sigmoid(module(ActivationCache(config.parent / "cache").read(heads).flatten(1)))
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("selection", ["heads", "layers", "top_k"])
def test_a_configured_selection_that_differs_is_refused(fitted, selection, capsys):
    config, checkpoint, _ = fitted
    heads, _ = scores_by_hand(checkpoint, config.parent / "cache")
    override = {"heads": f"--data.heads={json.dumps([list(pair) for pair in reversed(heads)])}",
                "layers": "--data.layers=[2, 1]", "top_k": "--data.top_k=3"}[selection]
    with pytest.raises(SystemExit):  # a user error: one line, no traceback
        main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), override])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sahs: error: ")]
    assert re.search(r"trained on \[\(%d, %d\), \(%d, %d\)\]" % (*heads[0], *heads[1]), line)
    assert f"data.{selection}" in line


def test_the_same_selection_given_explicitly_is_accepted(fitted):
    from sahs.cli import lightning_main

    config, checkpoint, _ = fitted
    heads, expected = scores_by_hand(checkpoint, config.parent / "cache")
    cli = lightning_main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint),
                          f"--data.heads={json.dumps([list(pair) for pair in heads])}"])
    assert cli.datamodule.selected_heads == heads
    val = cli.datamodule.splits["val"]
    labels = ActivationCache(config.parent / "cache").labels[val]
    reported = float(cli.trainer.callback_metrics["val/auroc"])
    assert reported == pytest.approx(roc_auc_score(labels.numpy(), expected[val].numpy()), abs=1e-4)


def test_a_cache_of_another_model_is_refused_naming_both(fitted, capsys):
    config, checkpoint, _ = fitted
    other = config.parent / "other"
    with pytest.raises(SystemExit):  # a user error: one line, no traceback
        main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), f"--data.cache_dir={other}"])
    assert re.search(r"sahs: error: .*synthetic.*other-model", capsys.readouterr().err)
    # The Trainer's own restore path refuses it too (the CLI's early check is not the only guard).
    import lightning as L

    datamodule = ActivationDataModule(str(other))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CacheMismatchError, match="other-model"):
        trainer.test(DetectorModule(), datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)


def test_testing_with_another_split_seed_warns_about_overlap(fitted):
    config, checkpoint, _ = fitted
    with pytest.warns(UserWarning, match="overlap its training rows"):
        main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), "--data.seed=5"])


def test_export_loads_without_lightning_and_scores_like_the_checkpoint(fitted, tmp_path):
    config, checkpoint, _ = fitted
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "detector")])
    heads, expected = scores_by_hand(checkpoint, config.parent / "cache")
    record = json.loads((tmp_path / "detector" / "detector.json").read_text())
    assert record["features"]["heads"] == [list(pair) for pair in heads]
    assert record["features"]["fingerprint"]["model"] == {"name": "synthetic"}
    assert record["detector"]["class_path"] == "sahs.models.detectors.LogisticDetector"
    assert record["threshold_rule"] == {"rule": "tpr", "target_tpr": 0.95, "chosen_on": "val"}
    script = (
        "import sys, torch\n"
        "from sahs.models.artifact import DetectorArtifact\n"
        "from sahs.data.cache import ActivationCache\n"
        f"artifact = DetectorArtifact.load({str(tmp_path / 'detector')!r})\n"
        f"x = ActivationCache({str(config.parent / 'cache')!r}).read(artifact.features.heads).flatten(1)\n"
        "torch.save(artifact.score(x), sys.argv[1])\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "scores.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "scores.pt"), expected)


def test_predict_logs_the_rows_as_a_wandb_table(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, checkpoint, _ = fitted
    try:
        main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint), "--data.predict_split=val",
              "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true",
              f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.project=sahs-test"])
    finally:
        wandb.finish()  # a run left open would be picked up by the next WandbLogger in this process
    written = pd.read_csv(tmp_path / "predictions.csv")
    (table_file,) = tmp_path.rglob("predictions_*.table.json")
    table = json.loads(table_file.read_text())
    logged = pd.DataFrame(table["data"], columns=table["columns"])
    assert logged["id"].tolist() == written["id"].tolist() and len(written) > 0
    torch.testing.assert_close(torch.tensor(logged["score"].to_numpy()), torch.tensor(written["score"].to_numpy()))
