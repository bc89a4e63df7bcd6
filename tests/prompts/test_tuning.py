"""Requests kept for tuning the model organism: never in an evaluation set, and the full sets still fit."""

from __future__ import annotations

from sahs.prompts.benign import benign_requests
from sahs.prompts.seeds import harmful_seeds, normalise
from sahs.prompts.synthetic import DemoPrompts, OfflineAttackSet
from sahs.prompts.tuning import RESERVED_SHARE, evaluation_seeds, is_reserved, tuning_benign, tuning_malicious


def test_tuning_requests_never_enter_an_evaluation_set(seed_cache: str) -> None:
    tuned = {normalise(s.text) for s in tuning_malicious(seed_cache)} | {normalise(s.text) for s in tuning_benign()}
    assert len(tuning_malicious(seed_cache)) > 150 and len(tuning_benign()) > 1000
    for source in (OfflineAttackSet(cache_dir=seed_cache), OfflineAttackSet(cache_dir=seed_cache, seed=3),
                   DemoPrompts(cache_dir=seed_cache, n_benign=300, n_malicious=300, seed=1)):
        planned = {normalise(row.seed.text) for row in source.plan()}  # the full offline set: 1,000 of each
        assert planned and not planned & tuned
    assert len(harmful_seeds(cache_dir=seed_cache)) - len(tuning_malicious(seed_cache)) >= 1000


def test_the_reserve_is_a_stable_share_chosen_per_request(seed_cache: str) -> None:
    seeds = harmful_seeds(cache_dir=seed_cache)
    reserved = tuning_malicious(seed_cache)
    assert [s.text for s in reserved] == [s.text for s in seeds if is_reserved(s.text)]
    assert abs(len(reserved) / len(seeds) - RESERVED_SHARE) < 0.02
    assert len(evaluation_seeds(seeds)) + len(reserved) == len(seeds)
    # Membership follows the request alone (up to case and spacing), whatever sources a set reads.
    assert all(is_reserved(f"  {s.text.upper()} ") for s in reserved)
    planned = OfflineAttackSet(seed_sources=["strongreject"], n_benign=250, n_malicious=250,
                               cache_dir=seed_cache).plan()
    assert not any(is_reserved(row.seed.text) for row in planned if row.label == 1)


def test_tuning_benign_requests_are_new_sentences() -> None:
    evaluation = {normalise(s.text) for s in benign_requests()}
    tuning = tuning_benign()
    texts = [normalise(s.text) for s in tuning]
    assert len(set(texts)) == len(texts) and not set(texts) & evaluation
    assert all(s.text[0].isupper() and s.text.endswith(("?", ".")) and "{" not in s.text for s in tuning)
