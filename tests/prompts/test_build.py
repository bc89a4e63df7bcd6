"""``sahs data build``: what it writes, what it refuses, and the shipped config."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest

from sahs.prompts.build import MANIFEST, build, build_parser, main
from sahs.prompts.schema import PROVENANCE_FILE, Mixture, PromptSource, SavedPrompts, prompt_set_hash
from sahs.prompts.synthetic import DemoPrompts, OfflineAttackSet

REPO = Path(__file__).resolve().parents[2]


def _small(cache: str, seed: int = 0) -> DemoPrompts:
    return DemoPrompts(n_benign=9, n_malicious=9, image_size=64, cache_dir=cache, seed=seed)


def _card_counts(card: str) -> dict[str, tuple[int, int]]:
    section = card.split("## Prompts per attack family and label")[1].split("##")[0]
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| \d+ \|$", section, flags=re.MULTILINE)
    return {attack: (int(ben), int(mal)) for attack, ben, mal in rows}


def test_build_writes_dataset_card_provenance_and_manifest(seed_cache: str, tmp_path: Path) -> None:
    source = _small(seed_cache)
    out = build(source, str(tmp_path / "set"))
    saved = SavedPrompts(str(out)).load()
    expected = source.load()
    assert prompt_set_hash(saved) == prompt_set_hash(expected) == json.loads((out / MANIFEST).read_text())["hash"]
    counts = Counter(zip(saved["attack"], saved["label"]))
    card = (out / "README.md").read_text()
    assert _card_counts(card) == {a: (counts[(a, 0)], counts[(a, 1)]) for a in set(saved["attack"])}
    provenance = source.provenance()
    for rid in saved["id"]:
        assert f"| {rid} | {provenance[rid].licence} |" in card
    lines = [json.loads(line) for line in (out / PROVENANCE_FILE).read_text().splitlines()]
    assert [line["id"] for line in lines] == saved["id"]


def test_refuses_a_folder_holding_other_files(seed_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{re.escape(str(out))}.*notes.txt.*--output"):
            build(_small(seed_cache), str(out), overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left behind


def test_replaces_an_earlier_build_only_when_asked(seed_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "set"
    build(_small(seed_cache), str(out))
    with pytest.raises(FileExistsError, match="--overwrite true"):
        build(_small(seed_cache, seed=1), str(out))
    build(_small(seed_cache, seed=1), str(out), overwrite=True)
    assert prompt_set_hash(SavedPrompts(str(out)).load()) == prompt_set_hash(_small(seed_cache, seed=1).load())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_mixture_over_a_build_leaves_its_folder_rebuildable(seed_cache: str, tmp_path: Path) -> None:
    out = build(_small(seed_cache), str(tmp_path / "set"))
    before = sorted(p.name for p in out.iterdir())
    figstep = Mixture([SavedPrompts(str(out))], attacks=["figstep"]).load()
    assert set(figstep["attack"]) == {"figstep"} and len(figstep) == 6
    assert sorted(p.name for p in out.iterdir()) == before
    build(_small(seed_cache, seed=2), str(out), overwrite=True)


class Broken(PromptSource):
    """A source that fails while loading."""

    def load(self) -> datasets.Dataset:
        raise RuntimeError("source failed")


def test_a_failed_load_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="source failed"):
        build(Broken(), str(tmp_path / "set"))
    assert list(tmp_path.iterdir()) == []


def test_main_reads_a_config_and_command_line_overrides(
    seed_cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(
        f"output: {tmp_path / 'out'}\n"
        "source:\n  class_path: sahs.prompts.DemoPrompts\n"
        f"  init_args:\n    n_benign: 6\n    n_malicious: 6\n    image_size: 32\n    cache_dir: {seed_cache}\n"
    )
    main(["--config", str(config), "--source.init_args.n_malicious", "9"])
    saved = SavedPrompts(str(tmp_path / "out")).load()
    assert Counter(saved["label"]) == {0: 6, 1: 9}
    assert "wrote 15 prompts" in capsys.readouterr().out
    assert "n_malicious: 9" in (tmp_path / "out" / "README.md").read_text()


def test_shipped_offline_config_parses_and_instantiates() -> None:
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(REPO / "configs" / "data" / "offline.yaml")])
    source = parser.instantiate(cfg).source
    assert isinstance(source, OfflineAttackSet) and cfg.overwrite is False
    assert source.attacks == ["text", "figstep", "typo", "template", "rephrase"]
    assert (source.n_benign, source.n_malicious) == (1000, 1000)
