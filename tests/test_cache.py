"""The activation cache: contents equal a direct capture, reuse needs no model, mismatches refuse."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache, CacheMismatchError, CacheMissingError
from sahs.extract import pipeline
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings, ensure_cache
from sahs.prompts.schema import make_dataset

SETTINGS = ExtractionSettings(batch_size=3, cache_dtype="float32", shard_size=4)


def prompt_set(n: int = 10, word: str = "bread"):
    records = []
    for i in range(n):
        image = Image.new("RGB", (24 + i, 24), (i * 20 % 255, 80, 160)) if i % 3 == 0 else None
        records.append({"id": f"p{i:02d}", "text": f"{'please ' * (i % 4)}tell me about {word} number {i}",
                        "image": image, "label": i % 2, "attack": ["text", "figstep"][i % 2 if i < 6 else (i + 1) % 2],
                        "source": "test", "category": "misc"})
    return make_dataset(records)


def direct_capture(prompts) -> torch.Tensor:
    """Every prompt alone through the model: no batching, no cache."""
    from sahs.extract.models import load_model

    model, processor = load_model(ModelConfig())
    rows = []
    with torch.inference_mode(), HeadCapture(find_adapter(model)) as hooks:
        for row in prompts:
            inputs = encode_batch(processor, [row["text"]], [row["image"]])
            rows.append(hooks.run(lambda: model(**inputs), last_real_position(inputs["attention_mask"]))[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def prompts():
    return prompt_set()


@pytest.fixture(scope="module")
def expected(prompts):
    return direct_capture(prompts)


def test_cache_holds_the_direct_capture_in_prompt_order(tmp_path, prompts, expected):
    assert ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False) == "built"
    cache = ActivationCache(tmp_path)
    assert cache.column("id") == prompts["id"]
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 3  # 10 prompts, 4 a shard
    full = cache.read().view(len(prompts), *expected.shape[1:])
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
    heads = [(3, 1), (0, 2)]
    torch.testing.assert_close(cache.read(heads), torch.stack([expected[:, 3, 1], expected[:, 0, 2]], 1),
                               atol=1e-4, rtol=1e-4)


def test_second_run_reuses_the_cache_without_loading_the_model(tmp_path, prompts, monkeypatch):
    ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the cache is valid")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    assert ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False) == "reused"


@pytest.mark.parametrize("change, key", [
    ("prompts", "prompts.sha256"), ("model", "model.seed"), ("dtype", "extraction.cache_dtype")])
def test_a_cache_from_other_settings_is_refused_or_rebuilt(tmp_path, prompts, change, key):
    ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False)
    other_prompts = prompt_set(word="cake") if change == "prompts" else prompts
    other_model = ModelConfig(seed=1) if change == "model" else ModelConfig()
    other_settings = ExtractionSettings(batch_size=3, shard_size=4, cache_dtype="float16") if change == "dtype" else SETTINGS
    with pytest.raises(CacheMismatchError, match=key.replace(".", r"\.")):
        ensure_cache(tmp_path, other_model, other_prompts, other_settings, progress=False)
    assert ActivationCache(tmp_path).fingerprint["model"]["seed"] == 0  # the refused cache is untouched
    assert ensure_cache(tmp_path, other_model, other_prompts, other_settings,
                        on_mismatch="rebuild", progress=False) == "built"
    assert ActivationCache(tmp_path).fingerprint == pipeline.expected_fingerprint(
        other_model, other_prompts, other_settings)


def test_resume_redoes_only_missing_and_corrupt_shards(tmp_path, prompts, expected, monkeypatch):
    ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False)
    shards = sorted((tmp_path / "shards").glob("*.safetensors"))
    redo = [pid for shard in shards[:2] for pid in json.loads(shard.with_suffix(".json").read_text())["ids"]]
    (tmp_path / "manifest.json").unlink()  # as if killed before the end
    shards[0].with_suffix(".json").unlink()  # killed between the tensor file and its sidecar
    shards[1].write_bytes(shards[1].read_bytes()[:-7])  # truncated on disk
    extracted: list[int] = []
    real = pipeline.extract_into
    monkeypatch.setattr(pipeline, "extract_into",
                        lambda root, m, p, batches, *a, **k: (extracted.extend(i for b in batches for i in b),
                                                              real(root, m, p, batches, *a, **k)))
    assert ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False) == "resumed"
    assert sorted(prompts["id"][i] for i in extracted) == sorted(redo)  # those two shards' prompts, nothing else
    cache = ActivationCache(tmp_path)
    assert sorted(cache.column("id")) == sorted(prompts["id"]) and len(cache) == len(prompts)
    torch.testing.assert_close(cache.read().view_as(expected), expected, atol=1e-4, rtol=1e-4)


def test_missing_cache_says_how_to_make_one(tmp_path):
    with pytest.raises(CacheMissingError, match="ActivationExtraction"):
        ActivationCache(tmp_path)


def test_a_folder_with_other_files_is_never_used(tmp_path, prompts):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not an activation cache"):
        ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, on_mismatch="rebuild", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_reading_heads_outside_the_cache_is_refused(tmp_path, prompts):
    ensure_cache(tmp_path, ModelConfig(), prompts, ExtractionSettings(layers=[0, 1], cache_dtype="float32"),
                 progress=False)
    cache = ActivationCache(tmp_path)
    assert cache.layers == [0, 1]
    with pytest.raises(ValueError, match="not in the cache"):
        cache.read([(3, 0)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["layout"]["num_layers"] == 4 and manifest["layout"]["layers"] == [0, 1]


def test_writer_holds_at_most_one_shard_and_reads_pick_any_heads(tmp_path):
    """Rows reach disk as soon as a shard is full; reads of any heads, in any order, match the rows written."""
    layout = {"num_layers": 3, "num_heads": 4, "head_dim": 2, "layers": [0, 1, 2], "family": "synthetic"}
    rows = torch.randn(11, 3, 4, 2)  # [rows, layers, heads, head_dim]
    cache_io.prepare_folder(tmp_path, {"model": "synthetic"}, rebuild=False)
    order = [7, 2, 9, 0, 4, 10, 1, 5, 8, 3, 6]  # written shuffled, as a length-sorted extraction does
    writer = cache_io.ShardWriter(tmp_path, layout, shard_size=3, dtype=torch.float32)
    for written in range(0, 11, 2):
        batch = order[written:written + 2]
        writer.add([f"s{i:02d}" for i in batch], rows[batch])
        assert len(cache_io.finished_shards(tmp_path)) == (written + len(batch)) // 3  # the rest is buffered
    writer.close()
    cache_io.write_manifest(tmp_path, [{"id": f"s{i:02d}", "label": i % 2} for i in range(11)])
    cache = ActivationCache(tmp_path)
    assert torch.equal(cache.read(), rows.flatten(1, 2))
    heads = [(2, 3), (0, 0), (2, 1), (1, 2)]
    assert torch.equal(cache.read(heads), torch.stack([rows[:, layer, head] for layer, head in heads], dim=1))


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_read_keeps_the_stored_dtype_when_asked(tmp_path, stored):
    features = torch.randn(70, 2, 3, 4)
    cache_io.prepare_folder(tmp_path, {"model": "synthetic"}, rebuild=False)
    layout = {"num_layers": 2, "num_heads": 3, "head_dim": 4, "layers": [5, 9]}
    writer = cache_io.ShardWriter(tmp_path, layout, shard_size=32, dtype=stored)
    writer.add([f"p{i}" for i in range(70)], features)
    writer.close()
    cache_io.write_manifest(tmp_path, [{"id": f"p{i}", "label": i % 2} for i in reversed(range(70))])
    cache = ActivationCache(tmp_path)
    as_stored, as_float = cache.read([(9, 2), (5, 0)], dtype=None), cache.read([(9, 2), (5, 0)])
    assert as_stored.dtype == stored and as_float.dtype == torch.float32
    expected = features.to(stored).float().flip(0)[:, [1, 0], [2, 0]]  # manifest order is reversed
    torch.testing.assert_close(as_stored.float(), expected, rtol=0, atol=0)
    torch.testing.assert_close(as_float, expected, rtol=0, atol=0)


def test_a_rebuild_deletes_only_the_files_a_cache_owns(tmp_path, prompts):
    ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False)
    theirs = {"shards/notes.txt": b"mine", "shards/r000-final.safetensors": b"not a shard name",
              "shards/results.json": b"{}"}
    for name, data in theirs.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CacheMismatchError, match="model.seed"):
        ensure_cache(tmp_path, ModelConfig(seed=1), prompts, SETTINGS, progress=False)
    assert ensure_cache(tmp_path, ModelConfig(seed=1), prompts, SETTINGS, on_mismatch="rebuild",
                        progress=False) == "built"
    assert {name: (tmp_path / name).read_bytes() for name in theirs} == theirs
    assert ActivationCache(tmp_path).fingerprint["model"]["seed"] == 1


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, prompts, expected, monkeypatch):
    """ENOSPC on the third shard: one line naming the file and the fix, no partial file left, nothing lost."""
    import errno

    from sahs.data import shards as shards_io
    from sahs.errors import UserError

    real_open, opened = open, []

    def filling_up(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".safetensors.%d.tmp" % os.getpid()):
            opened.append(path)
            if len(opened) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(shards_io, "open", filling_up, raising=False)
    with pytest.raises(UserError, match=r"cannot write .*r000-00002\.safetensors: no space left on the device\. "
                                        r"Free space") as error:
        ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False)
    assert "\n" not in str(error.value) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert ensure_cache(tmp_path, ModelConfig(), prompts, SETTINGS, progress=False) == "resumed"
    torch.testing.assert_close(ActivationCache(tmp_path).read().view_as(expected), expected, atol=1e-4, rtol=1e-4)
