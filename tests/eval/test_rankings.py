"""The ranking store: a ranking is computed once per distinct input, reused across runs and processes, never stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sahs.data import cache as cache_io
from sahs.data.datamodule import ActivationDataModule
from sahs.eval.probes import rank_heads
from sahs.data import rankings
from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out
from sahs.data.rankings import RankingStore
from sahs.models.detectors import LogisticDetector
from tests.synthetic import planted_features, write_cache

FAMILIES = ("figstep", "hades", "qr")
SIGNAL = {(1, 2): 3.0, (2, 4): 2.0}


@pytest.fixture
def data(make_features):
    features, labels, attacks = make_features(n=240, signal=SIGNAL, families=FAMILIES)
    groups = np.array([f"request-{i // 2}" for i in range(len(labels))])  # two prompts per request
    ids = [f"p{i}" for i in range(len(labels))]
    return features, labels, attacks, groups, ids


def _call(store: RankingStore, data, **changes) -> torch.Tensor:
    features, labels, attacks, groups, _ = data
    arguments = dict(rows=torch.arange(0, 200), layers=[0, 1, 2, 3], attacks=attacks, groups=groups, seed=0, l2=1e-2)
    arguments.update(changes)
    return store.rank(features, labels, **arguments).auroc


def test_every_key_change_reranks_and_same_inputs_reuse(data, tmp_path) -> None:
    features, labels, attacks, groups, ids = data
    store = RankingStore(tmp_path, {"model": "a"}, ids)
    first = _call(store, data)
    assert (store.computed, store.reused) == (1, 0) and len(list(tmp_path.glob("*.json"))) == 1
    torch.testing.assert_close(_call(store, data), first, rtol=0, atol=0)
    assert (store.computed, store.reused) == (1, 1)
    other_process = RankingStore(tmp_path, {"model": "a"}, ids)  # a new store reads the file
    torch.testing.assert_close(_call(other_process, data), first, rtol=0, atol=0)
    assert (other_process.computed, other_process.reused) == (0, 1)
    shuffled_attacks = np.roll(attacks, 1)
    changes = [
        dict(rows=torch.arange(1, 201)),  # the fold's rows
        dict(layers=[10, 11, 12, 13]),  # candidate layers
        dict(seed=1),
        dict(l2=1e-3),  # probe settings
        dict(holdout_fraction=0.25),
        dict(attacks=shuffled_attacks),  # what the probes' hold-out is stratified by
        dict(groups=None),
    ]
    for count, change in enumerate(changes, start=2):
        _call(other_process, data, **change)
        assert other_process.computed == count - 1, f"{change} did not re-rank"
    relabelled = RankingStore(tmp_path, {"model": "a"}, [f"q{i}" for i in range(len(ids))])  # other prompt ids
    moved = RankingStore(tmp_path, {"model": "b"}, ids)  # another cache fingerprint
    for store_with_other_key in (relabelled, moved):
        _call(store_with_other_key, data)
        assert store_with_other_key.computed == 1
    # What the store computed is what rank_heads computes on those inputs.
    expected = rank_heads(features, labels, rows=torch.arange(1, 201), layers=[0, 1, 2, 3], attacks=attacks,
                          groups=groups, seed=0)
    torch.testing.assert_close(_call(RankingStore(tmp_path, {"model": "a"}, ids), data, rows=torch.arange(1, 201)),
                               expected.auroc, rtol=0, atol=0)


def test_a_damaged_or_foreign_file_is_not_used(data, tmp_path) -> None:
    store = RankingStore(tmp_path, {"model": "a"}, data[4])
    first = _call(store, data)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text()[:100])  # cut short
    fresh = RankingStore(tmp_path, {"model": "a"}, data[4])
    torch.testing.assert_close(_call(fresh, data), first, rtol=0, atol=0)
    assert fresh.computed == 1
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 5'))  # the recorded inputs disagree with the key
    fresh = RankingStore(tmp_path, {"model": "a"}, data[4])
    _call(fresh, data)
    assert fresh.computed == 1


def test_loao_runs_that_vary_only_top_k_or_the_detector_fit_detectors_only(data, monkeypatch) -> None:
    features, labels, attacks, groups, ids = data
    store = RankingStore(None, {"model": "a"}, ids)
    settings = LoaoSettings(top_k=2, detector=LogisticDetector(l2=1e-2))
    first = leave_one_attack_out(features, labels, attacks, settings, groups=groups, rankings=store)
    without_store = leave_one_attack_out(features, labels, attacks, settings, groups=groups)
    assert store.computed == len(FAMILIES)
    for a, b in zip(first.folds, without_store.folds):
        assert a.heads == b.heads and a.metrics == b.metrics
    monkeypatch.setattr(rankings, "rank_heads", lambda *a, **k: pytest.fail("re-ranked a known fold"))
    for changed in (settings.with_(top_k=3), settings.with_(detector=LogisticDetector(l2=1.0))):
        result = leave_one_attack_out(features, labels, attacks, changed, groups=groups, rankings=store)
        assert all(a.model.ranking is b.model.ranking for a, b in zip(result.folds, first.folds))
    assert store.computed == len(FAMILIES) and store.reused == 2 * len(FAMILIES)
    monkeypatch.undo()
    leave_one_attack_out(features, labels, attacks, settings.with_(seed=1), groups=groups, rankings=store)
    assert store.computed == 2 * len(FAMILIES)  # another seed splits and ranks anew


def test_the_cache_keeps_its_rankings_folder_and_a_rebuild_drops_it(tmp_path, monkeypatch) -> None:
    features, labels, attacks = planted_features(n=200, signal_heads=[(1, 2), (2, 0)])
    write_cache(tmp_path, features, labels, attacks)
    first = ActivationDataModule(str(tmp_path), top_k=2)
    first.setup("fit")
    assert len(list((tmp_path / "rankings").glob("*.json"))) == 1
    monkeypatch.setattr(rankings, "rank_heads", lambda *a, **k: pytest.fail("ranked the same split twice"))
    second = ActivationDataModule(str(tmp_path), top_k=2)
    second.setup("fit")
    assert second.selected_heads == first.selected_heads
    fingerprint = cache_io.read_fingerprint(tmp_path)
    assert cache_io.check_folder(tmp_path, fingerprint, rebuild=False) == []  # still a cache, reusable
    cache_io.prepare_folder(tmp_path, {**fingerprint, "model": {"name": "other"}}, rebuild=True)
    assert not (tmp_path / "rankings").exists()


def test_select_heads_on_rows_equals_slicing_a_copy(data) -> None:
    from sahs.experiments.heads import select_heads

    features = data[0].half()
    heads, layers, rows = [(12, 5), (10, 0), (12, 1)], [10, 11, 12, 13], torch.tensor([7, 3, 99, 3])
    expected = torch.cat([features[rows][:, layers.index(layer), head] for layer, head in heads], dim=1)
    got = select_heads(features, heads, layers, rows)
    assert got.dtype == torch.float32 and torch.equal(got, expected.float())
    assert torch.equal(select_heads(features, heads, layers), select_heads(features, heads, layers, torch.arange(240)))


def _request_copies(requests: int = 90, copies: int = 3, head_dim: int = 48, seed: int = 0):
    """Rows that are near-copies of their request: head (0, 0) holds a random vector per request, labels are
    random per request, head (0, 1) is noise. Only a probe that sees a request's copies in training can
    score its held-out copy on head (0, 0)."""
    generator = torch.Generator().manual_seed(seed)
    request_labels = torch.randint(0, 2, (requests,), generator=generator)
    labels = request_labels.repeat_interleave(copies)
    features = torch.randn(requests * copies, 1, 2, head_dim, generator=generator)
    per_request = torch.randn(requests, head_dim, generator=generator).repeat_interleave(copies, 0)
    features[:, 0, 0] = per_request + 0.05 * features[:, 0, 0]
    groups = np.repeat([f"request-{i}" for i in range(requests)], copies)
    return features, labels, groups


@pytest.mark.parametrize("through_store", [False, True])
def test_the_ranking_hold_out_keeps_each_request_on_one_side(through_store: bool, tmp_path) -> None:
    features, labels, groups = _request_copies()
    if through_store:
        store = RankingStore(tmp_path, {"model": "copies"}, [f"p{i}" for i in range(len(labels))])
        rank = lambda **kw: store.rank(features, labels, l2=1e-4, **kw)  # noqa: E731
    else:
        rank = lambda **kw: rank_heads(features, labels, l2=1e-4, **kw)  # noqa: E731
    leaked = rank(groups=None).auroc[0, 0]  # copies on both sides: the probe recognizes memorized requests
    assert leaked > 0.9
    kept = rank(groups=groups)
    # Whole requests held out: the per-request vector says nothing about an unseen request's label. About
    # 27 held-out requests: chance AUROC has a standard deviation near 0.11.
    assert abs(float(kept.auroc[0, 0]) - 0.5) < 0.3
    assert kept.meta["n_holdout"] % 3 == 0
