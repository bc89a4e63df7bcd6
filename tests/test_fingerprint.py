"""Whatever changes the activations changes the fingerprint, and a cache made before the change is refused.

A tiny LLaVA saved with ``save_pretrained`` stands in for a local model folder, and the same files under a
fake hub cache (``models--org--name/snapshots/<commit>``, read offline) for a hub model. Each test
changes one thing: the weights, the processor or tokenizer config, the chat template, the hub commit,
the transformers version, the attention implementation, the dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers
from safetensors.torch import save_file

from sahs.data.cache import ActivationCache, CacheMismatchError, fingerprint_diff
from sahs.extract import model_files
from sahs.extract import models as models_io
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings, ensure_cache, expected_fingerprint
from sahs.extract.tiny import build_tiny_llava
from tests.test_cache import prompt_set

SETTINGS = ExtractionSettings(batch_size=4, cache_dtype="float32")


@pytest.fixture(autouse=True)
def hash_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SAHS_CACHE", str(tmp_path / "sahs-cache"))  # the weight hashes of this test only


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny_llava(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts():
    return prompt_set(4)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, saved_model, prompts) -> tuple[Path, Path]:
    """A cache made from a copy of the saved model folder: ``(model folder, cache folder)``."""
    root = tmp_path_factory.mktemp("local")
    model = Path(shutil.copytree(saved_model, root / "model"))
    assert ensure_cache(root / "cache", ModelConfig(name=str(model)), prompts, SETTINGS, progress=False) == "built"
    return model, root / "cache"


def assert_refused(cache: Path, model: ModelConfig, prompts, key: str) -> None:
    """The only changed fingerprint key is ``key``, and the cache is refused, naming it."""
    made = ActivationCache(cache).fingerprint
    assert fingerprint_diff(made, expected_fingerprint(model, prompts, SETTINGS)) == [key]
    with pytest.raises(CacheMismatchError, match=rf"changed: {key.replace('.', r'[.]')}"):
        ensure_cache(cache, model, prompts, SETTINGS, progress=False)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


@pytest.mark.parametrize("change, key", [
    ("weights", "model.weights.model.safetensors"),
    ("processor_config", "model.processor.processor_config.json"),
    ("tokenizer_config", "model.processor.tokenizer_config.json"),
    ("chat_template", "model.processor.chat_template.jinja"),
])
def test_a_changed_file_of_a_local_model_refuses_the_cache(local_cache, prompts, change, key):
    model, cache = local_cache
    originals = {p.name: p.read_bytes() for p in model.iterdir()}
    try:
        if change == "weights":  # other weights, same config.json
            other, _ = build_tiny_llava(seed=1)
            save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(model / "model.safetensors"),
                      metadata={"format": "pt"})
        elif change == "processor_config":
            config = json.loads((model / "processor_config.json").read_text())
            config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
            edit_json(model / "processor_config.json", **config)
        elif change == "tokenizer_config":
            edit_json(model / "tokenizer_config.json", model_max_length=2048)
        else:
            template = model / "chat_template.jinja"
            template.write_text(template.read_text().replace("USER: ", "User: "))
        assert_refused(cache, ModelConfig(name=str(model)), prompts, key)
    finally:
        for name, data in originals.items():
            (model / name).write_bytes(data)
    assert ensure_cache(cache, ModelConfig(name=str(model)), prompts, SETTINGS, progress=False) == "reused"


@pytest.mark.parametrize("change, key", [
    ("transformers", "model.transformers"), ("attn_implementation", "model.attn_implementation"),
    ("dtype", "model.dtype")])
def test_a_changed_runtime_setting_refuses_the_cache(local_cache, prompts, monkeypatch, change, key):
    model_dir, cache = local_cache
    if change == "transformers":
        major, minor, *rest = transformers.__version__.split(".")
        # The module object the fingerprint reads (importing Lightning's CLI can swap sys.modules' entry).
        monkeypatch.setattr(models_io.transformers, "__version__", f"{major}.{int(minor) + 1}.0")
        assert_refused(cache, ModelConfig(name=str(model_dir)), prompts, key)
    elif change == "attn_implementation":
        assert_refused(cache, ModelConfig(name=str(model_dir), attn_implementation="eager"), prompts, key)
    else:
        assert_refused(cache, ModelConfig(name=str(model_dir), dtype="bfloat16"), prompts, key)


def test_a_patch_release_of_transformers_keeps_the_cache(local_cache, prompts, monkeypatch):
    model_dir, cache = local_cache
    major, minor, *_ = transformers.__version__.split(".")
    monkeypatch.setattr(models_io.transformers, "__version__", f"{major}.{minor}.99")
    assert ensure_cache(cache, ModelConfig(name=str(model_dir)), prompts, SETTINGS, progress=False) == "reused"


def test_a_hub_model_is_pinned_by_the_commit_its_revision_resolved_to(tmp_path, saved_model, prompts, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--sahs-test--tiny-llava"
    first, second = "1" * 40, "2" * 40
    shutil.copytree(saved_model, repo / "snapshots" / first)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(first)
    model = ModelConfig(name="sahs-test/tiny-llava")  # revision None: whatever `main` points at
    assert ensure_cache(tmp_path / "cache", model, prompts, SETTINGS, progress=False) == "built"
    assert ActivationCache(tmp_path / "cache").fingerprint["model"]["commit"] == first

    shutil.copytree(saved_model, repo / "snapshots" / second)  # `main` moved on (the files may be the same)
    (repo / "refs" / "main").write_text(second)
    assert_refused(tmp_path / "cache", model, prompts, "model.commit")


def test_weights_are_hashed_once_until_they_change(tmp_path, saved_model, monkeypatch):
    model = Path(shutil.copytree(saved_model, tmp_path / "model"))
    hashed: list[str] = []
    real = model_files.sha256_file
    monkeypatch.setattr(model_files, "sha256_file", lambda path: (hashed.append(path.name), real(path))[1])
    first = model_files.weight_hashes(model)
    assert first == {"model.safetensors": real(model / "model.safetensors")}
    assert hashed == ["model.safetensors"]
    assert model_files.weight_hashes(model) == first and hashed == ["model.safetensors"]  # from the store
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place: same bytes, new times
    assert model_files.weight_hashes(model) == first and len(hashed) == 2
