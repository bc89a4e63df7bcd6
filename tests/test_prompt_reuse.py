"""A cache made for a prompt source is reused without rendering the source; any other cache renders it to check.

``DemoPrompts.load`` is counted: the fit-time callback, ``ensure_cache`` and ``extract_with_trainer`` must
not call it when the cache's fingerprint names the same source, and must call it (and compare the rows'
hash) when the cache was made by another definition or before identities were recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sahs.callbacks import ActivationExtraction
from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache, CacheDamagedError, CacheMismatchError
from sahs.extract import pipeline
from sahs.extract.distributed import extract_with_trainer
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings, ensure_cache
from sahs.prompts import DemoPrompts, prompt_set_hash
from sahs.prompts.identity import PromptSet

SETTINGS = ExtractionSettings(batch_size=4, cache_dtype="float32", shard_size=4)
DEFINITION = dict(n_benign=4, n_malicious=4, attacks=["text", "figstep"], image_size=32)


def demo(**changes) -> DemoPrompts:
    return DemoPrompts(**{**DEFINITION, **changes})


@pytest.fixture
def renders(monkeypatch) -> list[DemoPrompts]:
    """Every ``DemoPrompts.load`` call of the test, by instance."""
    calls: list[DemoPrompts] = []
    original = DemoPrompts.load

    def counting(self: DemoPrompts):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(DemoPrompts, "load", counting)
    return calls


@pytest.fixture
def built(tmp_path: Path, renders: list[DemoPrompts]) -> Path:
    assert ensure_cache(tmp_path / "cache", ModelConfig(), demo(), SETTINGS, progress=False) == "built"
    assert len(renders) == 1
    renders.clear()
    return tmp_path / "cache"


def test_the_fingerprint_names_the_source_and_hashes_the_rendered_rows(built: Path) -> None:
    rows = DemoPrompts.load(demo())
    assert ActivationCache(built).fingerprint["prompts"] == {
        "sha256": prompt_set_hash(rows), "count": 8, "source": demo().digest()}


def test_a_cache_made_for_the_same_source_is_reused_unrendered(built: Path, renders, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "extract_into", lambda *a, **k: pytest.fail("nothing is extracted on reuse"))
    assert ensure_cache(built, ModelConfig(), demo(), SETTINGS, progress=False) == "reused"
    callback = ActivationExtraction(ModelConfig(), demo(), SETTINGS, progress=False)
    assert callback.fill(str(built)) == "reused"
    assert extract_with_trainer(built, ModelConfig(), demo(), SETTINGS, accelerator="cpu", devices=1,
                                progress=False) == "reused"
    assert renders == []


def test_another_definition_is_rendered_and_refused(built: Path, renders) -> None:
    with pytest.raises(CacheMismatchError, match=r"prompts\.sha256"):
        ensure_cache(built, ModelConfig(), demo(seed=1), SETTINGS, progress=False)
    assert [r.seed for r in renders] == [1]
    assert ensure_cache(built, ModelConfig(), demo(seed=1), SETTINGS, on_mismatch="rebuild", progress=False) == "built"
    assert ActivationCache(built).fingerprint["prompts"]["source"] == demo(seed=1).digest()


def test_a_damaged_cache_of_the_same_source_is_refused_unrendered(built: Path, renders) -> None:
    shard = sorted((built / cache_io.SHARD_DIR).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match="sahs cache repair"):
        ensure_cache(built, ModelConfig(), demo(), SETTINGS, progress=False)
    assert renders == []


@pytest.mark.parametrize("recorded", ["rows only", "another code version"])
def test_a_cache_of_the_same_rows_without_this_identity_is_checked_by_rendering(tmp_path, renders, monkeypatch,
                                                                                 capsys, recorded) -> None:
    """A cache fingerprinted before identities were recorded, or by a definition whose code changed
    without changing the rows, is reused after rendering the set and comparing the rows' hash."""
    with monkeypatch.context() as patch:
        if recorded == "rows only":  # the prompts field as written before: {sha256, count}
            field = PromptSet.field.func
            patch.setattr(PromptSet, "field", property(lambda self: {k: field(self)[k] for k in ("sha256", "count")}))
        else:
            patch.setattr(DemoPrompts, "digest", lambda self: "0" * 64)
        assert ensure_cache(tmp_path, ModelConfig(), demo(), SETTINGS, progress=False) == "built"
    renders.clear()
    capsys.readouterr()
    for _ in range(2):  # every run renders: the cache does not name this source
        assert ensure_cache(tmp_path, ModelConfig(), demo(), SETTINGS, progress=False) == "reused"
    assert len(renders) == 2
    note = capsys.readouterr().out
    assert note.count("rendered to check this cache") == 2 and "re-extract into a new cache_dir" in note
    with pytest.raises(CacheMismatchError, match=r"prompts\.sha256"):  # other rows are still refused
        ensure_cache(tmp_path, ModelConfig(), demo(n_benign=6), SETTINGS, progress=False)
