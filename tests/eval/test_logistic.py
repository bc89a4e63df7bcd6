"""The fast logistic solvers against scikit-learn: per-head rankings, probe coefficients, L-BFGS optimality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from sahs.data.splits import split_rows
from sahs.eval.logistic import solve_lbfgs, solve_probes
from sahs.eval.probes import fit_head_probes, rank_heads

LAYERS, HEADS, HEAD_DIM = 4, 8, 16


def _graded_heads(n: int = 700, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Ten heads carry the label with decreasing strength; two heads sit far from zero (mean 400 std)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.randn(n, LAYERS, HEADS, HEAD_DIM, generator=generator)
    planted = [(layer, 2 * layer + parity) for layer in range(LAYERS) for parity in (0, 1)] + [(0, 7), (3, 0)]
    for rank, (layer, head) in enumerate(planted):
        direction = torch.randn(HEAD_DIM, generator=generator)
        features[:, layer, head] += (1.6 - 0.12 * rank) * labels[:, None] * direction / direction.norm()
    features[:, 1, 3] += 400.0  # a pure-noise head with a huge mean
    features[:, 2, 4] = features[:, 2, 4] * 0.01 + 4.0  # a planted head, tiny spread around a large mean
    return features, labels, planted


def _sklearn_ranking(features, labels, l2: float, seed: int) -> np.ndarray:
    """AUROC of one StandardScaler + LogisticRegression per head on rank_heads' split, in float64."""
    fit_rows, holdout_rows = split_rows(labels, [0.3], seed, part="head ranking rows", both_classes=True)
    scores = np.empty((LAYERS, HEADS))
    for layer in range(LAYERS):
        for head in range(HEADS):
            x = features[:, layer, head].double().numpy()
            scaler = StandardScaler().fit(x[fit_rows])
            probe = LogisticRegression(C=1 / (l2 * len(fit_rows)), tol=1e-10, max_iter=10_000)
            probe.fit(scaler.transform(x[fit_rows]), labels[fit_rows])
            decision = probe.decision_function(scaler.transform(x[holdout_rows]))
            scores[layer, head] = roc_auc_score(labels[holdout_rows], decision)
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ranking_matches_a_sklearn_probe_per_head(dtype: torch.dtype) -> None:
    features, labels, planted = _graded_heads()
    features = features.to(dtype)
    reference = _sklearn_ranking(features.float(), labels, l2=1e-2, seed=4)
    ranking = rank_heads(features, labels, l2=1e-2, seed=4)
    assert spearmanr(reference.flatten(), ranking.auroc.flatten().numpy())[0] >= 0.99
    top_reference = np.argsort(-reference.flatten(), kind="stable")[:8]
    assert {(int(i) // HEADS, int(i) % HEADS) for i in top_reference} == set(ranking.top(8))
    np.testing.assert_allclose(ranking.auroc.numpy(), reference, atol=2e-3)
    assert set(ranking.top(8)) <= set(planted)


def test_standardized_probes_match_sklearn_coefficients() -> None:
    features, labels, _ = _graded_heads(n=500)
    x = features.flatten(1, 2).transpose(0, 1).contiguous()  # [heads, n, head_dim], incl. the large-mean heads
    l2 = 3e-3
    fit = solve_probes(x.clone(), labels, l2=l2, standardize=True, tol=1e-6, max_iter=60)
    for head in [0, 11, 20, 31]:  # planted, large mean, planted with tiny spread, noise
        x64 = x[head].double().numpy()
        scaler = StandardScaler().fit(x64)
        reference = LogisticRegression(C=1 / (l2 * 500), tol=1e-12, max_iter=10_000).fit(scaler.transform(x64), labels)
        # Back to the features as given: w / std, bias - mean . w / std.
        coef = reference.coef_[0] / scaler.scale_
        bias = reference.intercept_[0] - scaler.mean_ @ coef
        np.testing.assert_allclose(fit.weight[head].double(), coef, atol=1e-3 * np.abs(coef).max(), rtol=0)
        logits = x64 @ fit.weight[head].double().numpy() + float(fit.bias[head])
        np.testing.assert_allclose(logits, x64 @ coef + bias, atol=2e-3 * max(1, np.abs(x64 @ coef + bias).max()))


def test_unstandardized_probes_with_huge_means_match_sklearn() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (400,), generator=generator)
    x = torch.randn(3, 400, 6, generator=generator)
    x[:, :, 0] += 1.5 * labels
    x[1] += 300.0  # float32 sums of raw values would cancel here: the solver centers this one explicitly
    x[2] *= 50.0
    weight, bias = fit_head_probes(x, labels, l2=1e-2, tol=1e-6, max_iter=60)
    for g in range(3):
        reference = LogisticRegression(C=1 / (1e-2 * 400), tol=1e-12, max_iter=10_000).fit(x[g].double(), labels)
        np.testing.assert_allclose(weight[g], reference.coef_[0], atol=1e-3 * max(1, np.abs(reference.coef_).max()))
        assert float(bias[g]) == pytest.approx(reference.intercept_[0], abs=5e-3 * max(1, abs(reference.intercept_[0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lbfgs_stops_at_the_optimum_sklearn_finds(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 2, (300,), generator=generator)
    x = (torch.randn(300, 40, generator=generator) + 3.0).to(dtype)
    x[:, :3] += labels[:, None].to(dtype)
    fit = solve_lbfgs(x, labels, l2=1e-2, tol=1e-6)
    # Optimality checked independently in float64 numpy: the gradient of mean BCE + l2/2 ||w||^2.
    x64, y64 = x.double().numpy(), labels.double().numpy()
    w, b = fit.weight.double().numpy(), float(fit.bias)
    residual = 1 / (1 + np.exp(-(x64 @ w + b))) - y64
    assert np.abs(x64.T @ residual / 300 + 1e-2 * w).max() <= 2e-6 and abs(residual.mean()) <= 2e-6
    reference = LogisticRegression(C=1 / (1e-2 * 300), tol=1e-10, max_iter=10_000).fit(x64, labels)
    np.testing.assert_allclose(w, reference.coef_[0], atol=1e-3 * np.abs(reference.coef_).max())
    assert int(fit.n_iter) < 100


def test_ranking_on_rows_equals_ranking_a_copy_of_them() -> None:
    features, labels, _ = _graded_heads(n=500)
    rows = torch.arange(0, 500, 3)
    attacks = np.array(["a", "b"])[np.arange(500) % 2]
    on_rows = rank_heads(features, labels, rows=rows, attacks=attacks, seed=2, device="cpu")
    copied = rank_heads(features[rows], labels[rows], attacks=attacks[rows.numpy()], seed=2, heads_per_chunk=5)
    torch.testing.assert_close(on_rows.auroc, copied.auroc, atol=1e-9, rtol=0)
    assert on_rows.meta["n_fit"] + on_rows.meta["n_holdout"] == len(rows)


def test_solvers_report_whether_their_stopping_rule_held() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (300,), generator=generator)
    x = torch.randn(4, 300, 6, generator=generator)
    x[0, :, 0] += 6 * labels  # nearly separable: needs the most steps
    done = solve_probes(x.clone(), labels, l2=1e-3)
    assert bool(done.converged.all()) and int(done.n_iter.max()) < 30
    cut = solve_probes(x.clone(), labels, l2=1e-3, max_iter=1)
    assert not bool(cut.converged[0]) and int(cut.n_iter[0]) == 1
    flat = x[1]
    assert bool(solve_lbfgs(flat, labels, l2=1e-2).converged)
    assert not bool(solve_lbfgs(flat, labels, l2=1e-2, max_iter=1).converged)
