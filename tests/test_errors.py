"""Every user error is one line that names the problem and the fix: no traceback, no usage dump.

Each case runs the real ``sahs`` entry point and reads what it printed. ``--debug`` and ``SAHS_DEBUG=1``
bring the traceback back.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

from sahs.cli import main
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionInputError, ExtractionSettings, ensure_cache
from sahs.prompts.schema import EmptyPromptSetError
from sahs.prompts.schema import make_dataset
from tests.synthetic import planted_features, write_cache
from tests.test_cache import prompt_set


def one_line_error(argv: list[str], capsys) -> str:
    """Run ``sahs argv``: it must exit with status 2 after one error line, with no traceback or usage."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()  # Lightning's own INFO lines may come first
    errors = [line for line in err if line.startswith("sahs: error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], "\n".join(err)
    assert not any("Traceback" in line or line.startswith(("usage:", "  File ")) for line in err), "\n".join(err)
    return errors[0]


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A fit config over a synthetic cache (no model)."""
    root = tmp_path_factory.mktemp("errors")
    features, labels, attacks = planted_features(n=60)
    write_cache(root / "cache", features, labels, attacks)
    return write_config(root / "run.yaml", trainer={"default_root_dir": str(root / "run"), "logger": False},
                        data={"cache_dir": str(root / "cache")})


def extraction_config(tmp_path: Path, prompts=None, **extraction_args) -> Path:
    """A run config whose extraction callback reads ``prompts`` (a saved set) with the tiny model."""
    saved = tmp_path / "prompts"
    (prompts if prompts is not None else prompt_set(4)).save_to_disk(str(saved))
    callback = {"class_path": "sahs.callbacks.ActivationExtraction", "init_args": {
        "prompts": {"class_path": "sahs.prompts.SavedPrompts", "init_args": {"path": str(saved)}},
        "progress": False, **extraction_args}}
    return write_config(tmp_path / "run.yaml", data={"cache_dir": str(tmp_path / "cache")},
                        trainer={"accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path / "run"),
                                 "callbacks": [callback]})


def test_an_empty_prompt_set(tmp_path, capsys):
    line = one_line_error(["extract", "--config", str(extraction_config(tmp_path, make_dataset([])))], capsys)
    assert f"saved prompt set at {tmp_path / 'prompts'} holds no prompts" in line
    # An empty set from a source that does load (a filter that kept nothing) is refused before any model loads.
    with pytest.raises(ExtractionInputError, match="the prompt set is empty.*check `prompts`"):
        ensure_cache(tmp_path / "cache", ModelConfig(), make_dataset([]), ExtractionSettings(), progress=False)


@pytest.mark.parametrize("override, named", [
    ("--data.top_k=1000", "data.top_k must be in [1, "),
    ("--data.heads=[[0, 99]]", "data.heads names [[0, 99]], not in the cache"),
])
def test_a_selection_the_new_cache_cannot_give_is_one_line_after_the_first_extraction(tmp_path, capsys, override,
                                                                                       named):
    config = extraction_config(tmp_path)  # no cache yet: the layout is known only once the run has extracted
    line = one_line_error(["fit", "--config", str(config), override, "--trainer.max_epochs=1"], capsys)
    assert named in line and f"the cache at {tmp_path / 'cache'} holds layers" in line
    assert (tmp_path / "cache" / "manifest.json").is_file()  # the extraction it paid for is kept


def test_empty_extraction_layers(tmp_path, capsys):
    config = extraction_config(tmp_path, extraction={"layers": []})
    assert "extraction.layers is empty" in one_line_error(["extract", "--config", str(config)], capsys)


@pytest.mark.parametrize("override, named", [
    ("--data.layers=[]", "data.layers is empty"),
    ("--data.heads=[]", "data.heads is empty"),
    ("--data.top_k=3", "data.heads and data.top_k are both set"),
    ("--data.val_fraction=0", "data.val_fraction is 0.0"),
])
def test_data_settings_that_cannot_work(synthetic_run, capsys, override, named):
    extra = ["--data.heads=[[0, 1]]"] if "top_k" in override else []
    line = one_line_error(["fit", "--config", str(synthetic_run), *extra, override], capsys)
    assert named in line
    if "val_fraction" in override:
        assert "threshold" in line and "(0, 1)" in line


def test_a_corrupt_image_names_its_prompt(tmp_path, capsys):
    records = [dict(row) for row in prompt_set(3)]
    records[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n but no image after the signature", "path": None}
    config = extraction_config(tmp_path, make_dataset(records))
    line = one_line_error(["extract", "--config", str(config)], capsys)
    assert f"prompt {records[1]['id']!r}" in line and "image cannot be read" in line


def test_a_model_not_available_offline_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = extraction_config(tmp_path, model={"name": "sahs-test/not-downloaded"})
    line = one_line_error(["extract", "--config", str(config)], capsys)
    assert "'sahs-test/not-downloaded' is not available offline" in line
    assert "hf download sahs-test/not-downloaded" in line and "local folder" in line


def test_a_typo_inside_the_extraction_block_names_the_key_and_what_is_accepted(tmp_path, capsys):
    config = extraction_config(tmp_path, extraction={"batch_szie": 4})
    line = one_line_error(["fit", "--config", str(config)], capsys)
    assert "trainer.callbacks[ActivationExtraction].extraction.batch_szie" in line
    assert "batch_size, layers, cache_dtype, shard_size, lock_timeout" in line and "did you mean batch_size" in line


def test_an_unknown_dtype_names_the_accepted_ones(tmp_path, capsys):
    config = extraction_config(tmp_path, model={"dtype": "fp17"})
    line = one_line_error(["extract", "--config", str(config)], capsys)
    assert "model.dtype got 'fp17'" in line and "'float32', 'float16', 'bfloat16'" in line


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_typo_in_a_section_lists_its_keys(synthetic_run, tmp_path, capsys, where):
    typo = ["--data.cache_dri=x"] if where == "command line" else [
        "--config", str(write_config(tmp_path / "typo.yaml", data={"cache_dri": "x"}))]
    line = one_line_error(["fit", "--config", str(synthetic_run), *typo], capsys)
    assert "unknown key data.cache_dri" in line and "did you mean data.cache_dir?" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    config = extraction_config(tmp_path, make_dataset([]))
    with pytest.raises(EmptyPromptSetError, match="holds no prompts"):
        main(["extract", "--config", str(config), "--debug"])
    monkeypatch.setenv("SAHS_DEBUG", "1")
    with pytest.raises(EmptyPromptSetError):
        main(["extract", "--config", str(config)])


def test_a_bug_keeps_its_traceback(synthetic_run, monkeypatch):
    from sahs.data import datamodule

    monkeypatch.setattr(datamodule.ActivationDataModule, "load", lambda self: [][1])
    with pytest.raises(IndexError):
        main(["fit", "--config", str(synthetic_run)])


@pytest.mark.parametrize("top_k, named", [("0", "a fractional top_k must be in (0, 1]"),
                                          ("999", "loao.top_k must be in [1, 12], got 999: there are 12 heads to choose")])
def test_a_loao_head_count_that_cannot_work(synthetic_run, capsys, top_k, named):
    assert named in one_line_error(["loao", "--config", str(synthetic_run), "--top_k", top_k], capsys)
    assert not (synthetic_run.parent / "run" / "loao").exists() or not any((synthetic_run.parent / "run" / "loao").iterdir())


def run_folders(config: Path) -> list[Path]:
    """Every run folder ``<root>/<verb>/<name>`` under the config's root."""
    return sorted(path for path in (config.parent / "run").glob("*/*") if path.is_dir())


@pytest.fixture
def no_cache_read(monkeypatch):
    """Fails the test if the run reads the cache: the refusal must come before any work."""
    from sahs.data import datamodule

    monkeypatch.setattr(datamodule.ActivationDataModule, "load", lambda self: pytest.fail("the cache was read"))


@pytest.mark.parametrize("override, named", [
    (["--data.top_k=100"], "data.top_k must be in [1, 12], got 100: there are 12 heads to choose"),
    (["--data.layers=[1, 2]", "--data.top_k=9"], "data.top_k must be in [1, 8], got 9: there are 8 heads of data.layers [1, 2]"),
    (["--data.heads=[[3, 9]]"], "data.heads [[3, 9]] are not in the cache"),
    (["--data.heads=[[0, 4], [1, 1]]"], "data.heads [[0, 4]] are not in the cache"),
    (["--data.layers=[1, 5]"], "data.layers [5] are not in the cache"),
], ids=["top_k", "top_k-of-layers", "heads-layer", "heads-head", "layers"])
def test_heads_the_cache_cannot_give_are_refused_before_any_work(synthetic_run, capsys, no_cache_read, override, named):
    before = run_folders(synthetic_run)
    line = one_line_error(["fit", "--config", str(synthetic_run), *override], capsys)
    assert named in line and "holds layers [0, 1, 2], 4 heads each" in line
    assert run_folders(synthetic_run) == before  # no run folder was made


@pytest.mark.parametrize("verb", ["fit", "loao"])
def test_a_sweep_definition_given_as_a_run_config_says_to_run_sweep(capsys, no_cache_read, verb):
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "demo_capacity.yaml"
    line = one_line_error([verb, "--config", str(sweep)], capsys)
    assert f"{sweep} is a sweep definition" in line and f"`sahs sweep {sweep}`" in line


def test_a_missing_checkpoint_is_named_before_any_work(synthetic_run, tmp_path, capsys, no_cache_read):
    before = run_folders(synthetic_run)
    line = one_line_error(["test", "--config", str(synthetic_run), "--ckpt_path", str(tmp_path / "no.ckpt")], capsys)
    assert f"--ckpt_path {tmp_path / 'no.ckpt'}: no such file" in line and "checkpoints/best-" in line
    assert run_folders(synthetic_run) == before


def test_a_selection_that_disagrees_with_the_checkpoint_is_one_line(synthetic_run, capsys):
    main(["fit", "--config", str(synthetic_run), "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    (checkpoint,) = (synthetic_run.parent / "run" / "fit").glob("*/checkpoints/*.ckpt")
    before = run_folders(synthetic_run)
    line = one_line_error(["validate", "--config", str(synthetic_run), "--ckpt_path", str(checkpoint),
                           "--data.top_k=3"], capsys)
    assert "data.top_k selects top_k=3" in line and "trained on [(0, 0), (0, 1)" in line and "(12 heads)" in line
    assert run_folders(synthetic_run) == before


def test_an_online_wandb_logger_without_a_login_says_how_to_log_in(synthetic_run, tmp_path, capsys, monkeypatch,
                                                                    no_cache_read):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no credentials on this machine, whatever it holds
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    line = one_line_error(["fit", "--config", str(synthetic_run),
                           "--trainer.logger=lightning.pytorch.loggers.WandbLogger"], capsys)
    assert "WandbLogger but W&B has no login" in line and "wandb login" in line and "WANDB_MODE=offline" in line


@pytest.mark.parametrize("argv, named", [
    (["--data.top_k=abc"], "config error: data.top_k got 'abc'; accepted: int or null"),
    (["--data.heads=[[1]]"], "config error: data.heads[] got '[1]'; accepted: tuple with 2 elements"),
    (["--top_k", "8"], "--top_k is not an option of `sahs fit`: did you mean --data.top_k? "
                       "(the short --top_k is an option of `sahs locate`, `sahs loao` and `sahs patch` only)"),
    (["--max_epochs", "3"], "--max_epochs is not an option of `sahs fit`: did you mean --trainer.max_epochs?"),
], ids=["not-an-int", "not-pairs", "short-form", "trainer-key"])
def test_a_value_or_a_short_option_that_does_not_fit_names_the_key(synthetic_run, capsys, argv, named):
    assert named in one_line_error(["fit", "--config", str(synthetic_run), *argv], capsys)


def test_a_failed_run_leaves_no_folder_that_looks_finished(synthetic_run, monkeypatch, capsys):
    import lightning.pytorch as pl

    def broken_test(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pl.Trainer, "test", broken_test)
    before = set(run_folders(synthetic_run))
    with pytest.raises(RuntimeError, match="disk full"):
        main(["fit", "--config", str(synthetic_run), "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    (failed,) = set(run_folders(synthetic_run)) - before
    assert (failed / "FAILED").read_text() == "RuntimeError: disk full\n"
    assert any((failed / "checkpoints").glob("*.ckpt"))  # what it wrote is kept, marked
    # A run that failed before writing anything but its config leaves no folder.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lonely"):
        main(["loao", "--config", str(lonely_config(synthetic_run.parent))])
    assert not any((synthetic_run.parent / "lonely" / "loao").iterdir())


def lonely_config(root: Path) -> Path:
    """A LOAO run whose family 'lonely' has malicious prompts only: its fold fails."""
    features, labels, attacks = planted_features(n=60)
    attacks = ["lonely" if y == 1 and i < 20 else a for i, (y, a) in enumerate(zip(labels.tolist(), attacks))]
    write_cache(root / "lonely" / "cache", features, labels, attacks)
    return write_config(root / "lonely" / "run.yaml", data={"cache_dir": str(root / "lonely" / "cache")},
                        trainer={"default_root_dir": str(root / "lonely"), "logger": False}, loao={"top_k": 4})


@pytest.mark.parametrize("override, key", [("--data.layers=[0, 1]", "data.layers"), ("--data.heads=[[1, 0]]", "data.heads")])
def test_layers_the_extraction_leaves_out_are_refused_before_it_runs(tmp_path, capsys, monkeypatch, override, key):
    from sahs.callbacks import extraction

    monkeypatch.setattr(extraction, "ensure_cache", lambda *args, **kwargs: pytest.fail("extraction started"))
    config = extraction_config(tmp_path, extraction={"layers": [0]})
    line = one_line_error(["fit", "--config", str(config), override], capsys)
    assert f"{key} names layers [1] that the extraction does not keep (extraction.layers [0])" in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*/*"))
