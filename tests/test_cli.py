"""The real `sahs` command on a trimmed demo config, and every shipped config parses and builds."""

from __future__ import annotations

import csv
import importlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from omegaconf import OmegaConf
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


@pytest.fixture
def organism(organism_cache, monkeypatch):
    """The demo's model, the model organism, from the session's one build."""
    monkeypatch.setenv("SAHS_CACHE", str(organism_cache))


def test_demo_fits_end_to_end_and_reports_the_auroc_it_logged(tmp_path, capsys, organism):
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


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The logged rows of an offline W&B run, read back from its transaction log.

    The ``.wandb`` file is a LevelDB-style log: a 7-byte file header (``:W&B``, magic, version), then
    32 KiB blocks of records, each with a 7-byte header (crc32, little-endian length, type: 1 whole,
    2 first, 3 middle, 4 last piece); every record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    rows, position, pending, block = [], 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if kind == 0:
            break
        piece, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_logging_works_without_network(tmp_path, monkeypatch, capsys, organism):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = trimmed_demo(tmp_path, class_path="lightning.pytorch.loggers.WandbLogger",
                          init_args={"offline": True, "save_dir": str(tmp_path / "wandb"), "project": "sahs-test"})
    main(["fit", "--config", str(config), "--trainer.max_epochs=2"])
    wandb.teardown()  # finish the run and write its log to disk, as leaving the process would
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[sahs] test/"))
    printed = dict(pair.split("=") for pair in printed.removeprefix("[sahs] ").split())
    (run_file,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    validations = [row for row in history if "val/auroc" in row]
    tests = [row for row in history if "test/auroc" in row]
    assert len(validations) == 3 and len(tests) == 1  # two epochs and the final validation; one test
    for name in ("val/auroc", "val/acc@0.5", "val/acc@thr", "val/asr", "val/pr"):
        assert float(printed[name]) == pytest.approx(validations[-1][name], abs=5e-5), name
    for name in ("test/auroc", "test/auprc", "test/fpr95", "test/asr", "test/pr"):
        assert float(printed[name]) == pytest.approx(tests[0][name], abs=5e-5), name
    assert any("train/loss" in row for row in history)


def assert_configured(held: object, spec: dict, where: str) -> None:
    """Every setting of a config section ``spec`` is what the built object ``held`` holds."""
    for key, value in spec.items():
        got = held[key] if isinstance(held, Mapping) else getattr(held, key)
        if isinstance(value, dict) and "class_path" in value:
            module, _, name = value["class_path"].rpartition(".")
            assert type(got) is getattr(importlib.import_module(module), name), f"{where}.{key}"
            assert_configured(got, value.get("init_args", {}), f"{where}.{key}")
        elif isinstance(value, dict):
            assert_configured(got, value, f"{where}.{key}")
        elif isinstance(value, list) and any(isinstance(item, dict) and "class_path" in item for item in value):
            assert len(got) == len(value), f"{where}.{key}"  # e.g. a Mixture's sources
            assert_configured(dict(enumerate(got)), dict(enumerate(value)), f"{where}.{key}")
        else:
            assert got == value, f"{where}.{key}: {got!r} != {value!r}"


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates_what_it_says(config):
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                  args=["--config", str(config), "--trainer.logger=false"])
    raw = OmegaConf.to_container(OmegaConf.load(config), resolve=True)  # ${benchmarks_root}/... resolved
    # The detector (top_k, layers, heads, lr, ... and its own arguments) and the data selection.
    assert_configured({"detector": cli.model.detector, **cli.model.hparams}, raw["model"], "model")
    assert_configured(cli.datamodule.hparams, raw["data"], "data")
    trainer = {k: v for k, v in raw["trainer"].items() if k not in ("logger", "callbacks", "accelerator", "devices")}
    assert_configured(cli.trainer, trainer, "trainer")
    for spec in raw["trainer"]["callbacks"]:  # the extraction (model, prompt set, settings), checkpointing
        module, _, name = spec["class_path"].rpartition(".")
        (callback,) = [c for c in cli.trainer.callbacks if type(c) is getattr(importlib.import_module(module), name)]
        assert_configured(callback, spec["init_args"], name)
    assert cli.trainer.checkpoint_callback.monitor == "val/auroc"  # a metric the module logs


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


def test_extract_verb_writes_the_cache_that_fit_reuses(tmp_path, capsys, organism):
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


def test_benchmark_mix_config_prints_offline_with_one_root(capsys, monkeypatch):
    config = str(ROOT / "configs" / "llava_benchmarks.yaml")
    for root in (None, "/mnt/benchmarks"):
        if root is None:
            monkeypatch.delenv("SAHS_BENCHMARKS", raising=False)
        else:
            monkeypatch.setenv("SAHS_BENCHMARKS", root)
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", config, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        expected = root or "/data/benchmarks"
        assert printed["benchmarks_root"] == expected
        extraction = printed["trainer"]["callbacks"][0]["init_args"]
        assert extraction["model"]["name"] == "llava-hf/llava-1.5-7b-hf"
        sources = extraction["prompts"]["init_args"]["sources"]
        names = [source["class_path"].rsplit(".", 1)[1] for source in sources]
        assert names == ["MMSafetyBench", "FigStepSafeBench", "JailbreakV28K", "HADES", "MMVet", "XSTest", "VLGuard"]
        folders = [source["init_args"].get("root") or source["init_args"]["path"] for source in sources]
        assert all(folder.startswith(expected + "/") for folder in folders)
        assert sources[5]["init_args"]["labels"] == ["safe"] and sources[6]["init_args"]["subsets"] == ["safe_safes"]


def test_help_and_an_unknown_verb_import_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import sys; from sahs.__main__ import main; main(['--help'])\n"
            "try:\n    main(['fti'])\nexcept SystemExit as exit:\n    print('exit', exit.code)\n"
            "print('heavy', sorted(m for m in ('torch', 'lightning', 'jsonargparse', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "heavy []" in done.stdout and "exit 2" in done.stdout
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    from sahs.commands import LIGHTNING_VERBS, VERBS

    assert listed == [*LIGHTNING_VERBS, *VERBS]
    assert done.stderr.strip() == ("sahs: error: unknown command 'fti', did you mean 'fit'? The verbs are "
                                   f"{', '.join([*LIGHTNING_VERBS, *VERBS])} (`sahs --help` describes them)")


@pytest.mark.parametrize("argv, shown", [(["data", "--help"], "sahs data build --config"),
                                         (["cache", "--help"], "sahs cache verify DIR"),
                                         (["cache", "repair", "--help"], "sahs cache repair DIR --config")])
def test_a_verbs_help_exits_0_and_shows_its_usage(capsys, argv, shown):
    main(argv)  # returns: exit status 0
    assert shown in capsys.readouterr().out
