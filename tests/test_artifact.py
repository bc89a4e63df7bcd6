"""Self-contained checkpoints, `sahs predict` files and `sahs export` folders, on a synthetic cache.

Scores are recomputed by hand from the checkpoint's raw state dict and the cache's raw activations;
AUROC by scikit-learn against the figure `sahs fit` reported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


@pytest.fixture(scope="module")
def export_folder(fitted, tmp_path_factory):
    _, checkpoint, _ = fitted
    folder = tmp_path_factory.mktemp("export") / "detector"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder)])
    return folder


def edited_copy(export_folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of the export whose detector.json (a dict) or weights (a dict of tensors) ``edit`` changed."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(export_folder, tmp_path / "edited"))
    record = json.loads((folder / "detector.json").read_text())
    weights = load_file(str(folder / "detector.safetensors"))
    edit(record, weights)
    (folder / "detector.json").write_text(json.dumps(record))  # NaN and Infinity as Python's json writes them
    save_file(weights, str(folder / "detector.safetensors"))
    return folder


def _set(path: str, value):
    def edit(record, weights):
        *parents, leaf = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        node[leaf] = value(node[leaf]) if callable(value) else value
    return edit


def _nan_weight(record, weights):
    weights["linear.weight"][0, 3] = float("nan")


def _swap_heads(record, weights):
    heads = record["features"]["heads"]
    heads[0], heads[1] = heads[1], heads[0]  # still fits every shape: only the checksum can tell


EDITS = {
    "threshold NaN": (_set("threshold", float("nan")), "field threshold"),
    "threshold text": (_set("threshold", "high"), "threshold"),
    "threshold missing": (lambda r, w: r.pop("threshold"), "field threshold is missing"),
    "mean inf": (_set("scaler.mean", lambda v: [float("inf"), *v[1:]]), r"field scaler\.mean holds NaN or infinite"),
    "std zero": (_set("scaler.std", lambda v: [0.0, *v[1:]]), r"field scaler\.std holds zero"),
    "std short": (_set("scaler.std", lambda v: v[1:]), r"field scaler\.std has shape"),
    "weight NaN": (_nan_weight, r"weight linear\.weight holds NaN"),
    "head out of range": (_set("features.heads", lambda v: [[2, 9], *v[1:]]), r"features\.heads has \[\(2, 9\)\] outside"),
    "head twice": (_set("features.heads", lambda v: [v[0], v[0]]), r"features\.heads lists a head twice"),
    "one head fewer": (_set("features.heads", lambda v: v[:1]), r"detector\.in_features is 16, but 1 heads"),
    "heads not pairs": (_set("features.heads", [[1, 2, 3]]), r"features\.heads must be"),
    "layout missing": (lambda r, w: r["features"].pop("layout"), r"features\.layout"),
    "detector missing": (lambda r, w: r.pop("detector"), "field detector is missing"),
    "model not an object": (_set("features.fingerprint.model", "synthetic"), r"features\.fingerprint\.model is not"),
    "init_args not an object": (_set("detector.init_args", [1]), r"field detector needs"),
    "unknown detector argument": (_set("detector.init_args", lambda v: {**v, "l3": 1}), r"do not fit field detector"),
    "heads swapped": (_swap_heads, "does not match its field checksum"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_export_is_refused_in_one_line_naming_the_field(export_folder, tmp_path, edit, capsys):
    from sahs.models.artifact import DetectorArtifact, DetectorArtifactError

    change, named = EDITS[edit]
    folder = edited_copy(export_folder, tmp_path, change)
    with pytest.raises(DetectorArtifactError, match=named) as error:
        DetectorArtifact.load(folder)
    assert str(folder) in str(error.value) and "sahs export" in str(error.value)
    (tmp_path / "prompts.jsonl").write_text('{"text": "How do I make a bomb?"}\n')
    with pytest.raises(SystemExit) as verdict:  # the guard refuses it before loading any model
        main(["guard", "--detector", str(folder), "--input", str(tmp_path / "prompts.jsonl")])
    err = capsys.readouterr().err.strip()
    assert verdict.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err and "detector" in err


def test_the_untouched_export_and_its_scores_load(export_folder, fitted):
    from sahs.models.artifact import DetectorArtifact

    config, checkpoint, _ = fitted
    heads, expected = scores_by_hand(checkpoint, config.parent / "cache")
    artifact = DetectorArtifact.load(export_folder)
    x = ActivationCache(config.parent / "cache").read(artifact.features.heads).flatten(1)
    torch.testing.assert_close(artifact.score(x), expected)
    torch.testing.assert_close(artifact.score(x.numpy()), expected)  # a numpy array scores the same
    torch.testing.assert_close(artifact.score(x.double().numpy()), expected)


def test_export_refuses_to_replace_a_detector_unless_asked_and_follows_the_umask(fitted, tmp_path, capsys):
    config, checkpoint, _ = fitted
    folder = tmp_path / "detector"
    old = os.umask(0o027)
    try:
        main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder)])
        (folder / "detector.json").write_text("{}")  # stands for an earlier, different export
        with pytest.raises(SystemExit) as verdict:
            main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder)])
        assert verdict.value.code == 2 and "--overwrite" in capsys.readouterr().err
        assert (folder / "detector.json").read_text() == "{}"  # left as it was
        main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder), "--overwrite"])
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "detector.json": 0o640, "detector.safetensors": 0o640}
    from sahs.models.artifact import DetectorArtifact

    assert DetectorArtifact.load(folder).features.heads == DetectorArtifact.read_checkpoint(checkpoint).features.heads


@pytest.mark.parametrize("problem", ["missing", "not a checkpoint", "no record"])
def test_export_of_a_bad_checkpoint_is_one_line(tmp_path, problem, capsys):
    path = tmp_path / "best.ckpt"
    if problem == "not a checkpoint":
        path.write_bytes(b"not a zip file")
    elif problem == "no record":
        torch.save({"state_dict": {}}, path)
    with pytest.raises(SystemExit) as verdict:
        main(["export", "--ckpt_path", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert verdict.value.code == 2 and err.count("\n") == 0 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
