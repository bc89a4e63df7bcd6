"""Per-head probes: planted heads are found, and the batched fit agrees with scikit-learn."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from sahs.data.splits import split_rows
from sahs.eval.probes import HeadRanking, fit_head_probes, rank_heads

SIGNAL = {(1, 2): 4.0, (3, 0): 2.5, (0, 5): 1.5}  # strongest first


def test_planted_heads_rank_first_in_order_of_strength(make_features) -> None:
    features, labels, _ = make_features(n=600, signal=SIGNAL)
    ranking = rank_heads(features, labels)
    assert ranking.top(3) == list(SIGNAL)
    assert ranking.auroc[1, 2] > 0.95
    others = torch.ones(4, 6, dtype=torch.bool)
    others[tuple(torch.tensor(list(SIGNAL)).T)] = False
    assert ranking.auroc[others].max() < 0.65  # pure noise heads sit near chance


def test_probe_auroc_agrees_with_sklearn_on_sampled_heads(make_features) -> None:
    features, labels, _ = make_features(n=500, signal=SIGNAL)
    l2 = 1e-2
    ranking = rank_heads(features, labels, l2=l2, seed=3)
    fit_rows, holdout_rows = split_rows(labels, [0.3], seed=3)
    for layer, head in [(1, 2), (0, 5), (2, 2), (3, 4)]:
        x = features[:, layer, head].numpy()
        scaler = StandardScaler().fit(x[fit_rows])
        probe = LogisticRegression(C=1 / (l2 * len(fit_rows)), tol=1e-10, max_iter=10_000)
        probe.fit(scaler.transform(x[fit_rows]), labels[fit_rows])
        expected = roc_auc_score(labels[holdout_rows], probe.decision_function(scaler.transform(x[holdout_rows])))
        assert float(ranking.auroc[layer, head]) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("seed", [0, 1, 3])
@pytest.mark.parametrize("l2", [1e-2, 1e-3])
def test_batched_probe_coefficients_match_sklearn(l2: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (400,), generator=generator)
    x = torch.randn(5, 400, 6, generator=generator)  # 5 probes
    x[0, :, 0] += 6 * labels  # nearly separable: the Newton phase has work to do
    x[1] *= 3
    # The probe stops once its predicted step to the optimum is below tol = 1e-5 (the default); that
    # estimate can fall short by a few times in the bounded phase, far inside the 1e-3 checked here.
    weight, bias = fit_head_probes(x, labels.float(), l2=l2)
    for g in range(5):
        reference = LogisticRegression(C=1 / (l2 * 400), tol=1e-10, max_iter=10_000).fit(x[g], labels)
        np.testing.assert_allclose(weight[g], reference.coef_[0], atol=1e-3 * max(1, np.abs(reference.coef_).max()))
        assert float(bias[g]) == pytest.approx(reference.intercept_[0], abs=1e-3)


def test_chunking_and_float16_do_not_change_the_ranking(make_features) -> None:
    features, labels, _ = make_features(n=300, signal=SIGNAL)
    in_float32 = rank_heads(features, labels)  # the original activations
    half = features.half()  # as the cache stores them
    whole = rank_heads(half, labels, heads_per_chunk=1000)
    chunked = rank_heads(half, labels, heads_per_chunk=5)
    torch.testing.assert_close(chunked.auroc, whole.auroc, atol=1e-3, rtol=0)
    # Rounding the activations to float16 moves a probe's held-out AUROC by at most a few of its
    # about 45 x 45 (benign, malicious) held-out pairs, and leaves the planted heads first.
    assert (whole.auroc - in_float32.auroc).abs().max() <= 3 / (whole.meta["n_holdout"] / 2) ** 2
    assert whole.top(3) == in_float32.top(3) == list(SIGNAL)


def test_save_load_csv_and_plot(make_features, tmp_path) -> None:
    features, labels, _ = make_features(n=300, signal=SIGNAL)
    ranking = rank_heads(features, labels)
    loaded = HeadRanking.load(ranking.save(tmp_path / "ranking"))
    torch.testing.assert_close(loaded.auroc, ranking.auroc, rtol=0, atol=0)
    assert loaded.top(24) == ranking.top(24) and loaded.meta["n_fit"] == ranking.meta["n_fit"]
    with open(tmp_path / "ranking" / "head_ranking.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == ranking.top(24)
    assert [float(r["auroc"]) for r in rows] == sorted((float(a) for a in ranking.auroc.flatten()), reverse=True)
    image = imread(ranking.plot(tmp_path / "heads.png", selected=ranking.top(3)))
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_heatmap_boxes_the_selected_heads_on_model_layer_ticks(make_features, k: int) -> None:
    features, labels, _ = make_features(n=300, signal=SIGNAL)
    ranking = rank_heads(features, labels, layers=[2, 3, 5, 7])
    axes = ranking.figure(ranking.top(k)).axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["2", "3", "5", "7"]
    assert list(axes.get_yticks()) == [0, 1, 2, 3] and list(axes.get_xticks()) == list(range(6))
    assert [t.get_text() for t in axes.get_xticklabels()] == [str(head) for head in range(6)]
    boxed = [(round(box.get_y() + 0.5), round(box.get_x() + 0.5)) for box in axes.patches]  # (row, column)
    assert len(boxed) == k and all((box.get_width(), box.get_height()) == (1, 1) for box in axes.patches)
    assert boxed[:3] == list(SIGNAL)[:k]  # the planted heads, at their rows of the feature axis
    assert set(boxed) == {(ranking.layers.index(layer), head) for layer, head in ranking.top(k)}
    with pytest.raises(KeyError, match=r"covers layers \[2, 3, 5, 7\]"):
        ranking.figure([(1, 2)])


def test_heatmap_colour_scale_spans_a_near_chance_map(make_features) -> None:
    features, labels, _ = make_features(n=300, signal={})
    ranking = rank_heads(features, labels)
    image = ranking.figure().axes[0].images[0]
    low, high = float(ranking.auroc.min()), float(ranking.auroc.max())
    assert low < 0.5 < high < 0.8  # a map of noise heads
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((low, high))
    assert (image.norm(low), image.norm(high)) == (0, 1)  # the colour map's two ends
    below_chance = ranking.auroc[ranking.auroc < 0.5].numpy()
    assert len({tuple(rgba) for rgba in image.to_rgba(below_chance)}) > len(below_chance) / 2  # not one colour


def test_a_ranking_over_a_layer_subset_names_model_layers(make_features, tmp_path) -> None:
    features, labels, _ = make_features(n=400, layers=4, signal={(2, 1): 4.0})
    ranking = rank_heads(features[:, 1:3], labels, layers=[1, 2])  # the model's layers 1 and 2 only
    assert ranking.top(1) == [(2, 1)] and ranking.layers == [1, 2]
    assert ranking.score(2, 1) == (float(ranking.auroc[1, 1]), float(ranking.accuracy[1, 1]))
    loaded = HeadRanking.load(ranking.save(tmp_path))
    assert loaded.layers == [1, 2] and loaded.top(3) == ranking.top(3)
    with open(tmp_path / "head_ranking.csv") as handle:
        first = next(csv.DictReader(handle))
    assert (int(first["layer"]), int(first["head"])) == (2, 1)
    with pytest.raises(KeyError, match="covers layers"):
        ranking.score(0, 1)


def test_bad_input_raises(make_features) -> None:
    features, labels, _ = make_features(n=100)
    with pytest.raises(ValueError, match="head ranking rows: .* no benign prompts"):
        rank_heads(features, torch.ones_like(labels))
    features[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        rank_heads(features, labels)
