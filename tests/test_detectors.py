"""Detectors: scikit-learn agreement, planted signals, sparsity optimality, config schema."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from docstring_parser import parse
from jsonargparse import ArgumentParser
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from sahs.models.detectors import Detector, LogisticDetector, MLPDetector, SparseL1Detector

HEAD_DIM = 8


def _planted(n: int, heads: int = 5, strength: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated heads ``[n, heads * HEAD_DIM]``; head 1 carries the label along two dimensions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, heads * HEAD_DIM, generator=generator)
    x[:, HEAD_DIM : HEAD_DIM + 2] += strength * labels[:, None] / np.sqrt(2)
    return x, labels


def _smooth_gradient(x: torch.Tensor, y: torch.Tensor, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    """Gradient of the mean logistic loss, computed in numpy."""
    x64, y64 = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    residual = 1 / (1 + np.exp(-(x64 @ w + b))) - y64
    return x64.T @ residual / len(y64), residual.mean()


@pytest.mark.parametrize("l2", [0.1, 0.01])
def test_logistic_matches_sklearn(l2: float) -> None:
    x, y = _planted(1000, strength=1.0)
    train, test = slice(0, 600), slice(600, None)
    detector = LogisticDetector(l2=l2).fit(x[train], y[train], tol=1e-7)
    # sklearn minimizes 0.5||w||^2 + C * sum(loss); ours l2/2 ||w||^2 + mean(loss): C = 1 / (l2 * n).
    reference = LogisticRegression(C=1 / (l2 * 600), tol=1e-10, max_iter=10_000).fit(x[train], y[train])
    ours = roc_auc_score(y[test], detector.decision_function(x[test]))
    assert ours == pytest.approx(roc_auc_score(y[test], reference.decision_function(x[test])), abs=0.005)
    np.testing.assert_allclose(detector.coef_, reference.coef_[0], atol=2e-3 * np.abs(reference.coef_).max())
    assert detector.intercept_ == pytest.approx(reference.intercept_[0], abs=2e-3)


DETECTORS = {
    "logistic": lambda: LogisticDetector(l2=1e-2),
    "l1": lambda: SparseL1Detector(l1=1e-2, head_dim=HEAD_DIM),
    "group_lasso": lambda: SparseL1Detector(l1=1e-2, group_lasso=True, head_dim=HEAD_DIM),
    "mlp": lambda: MLPDetector(hidden=[16], l2=1e-2),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_planted_head_is_detected(name: str) -> None:
    torch.manual_seed(0)
    x, y = _planted(800, strength=5.0)
    detector = DETECTORS[name]().fit(x[:400], y[:400], max_iter=3000)
    assert roc_auc_score(y[400:], detector.decision_function(x[400:])) >= 0.99


def null_auroc_sd(labels: torch.Tensor) -> float:
    """Standard deviation of the AUROC of scores independent of ``labels`` (Mann-Whitney U under the null)."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return float(np.sqrt((negatives + positives + 1) / (12 * negatives * positives)))


@pytest.mark.filterwarnings("ignore:MLPDetector.fit stopped at max_iter")  # memorizing noise takes long
@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_shuffled_labels_stay_at_chance(name: str) -> None:
    torch.manual_seed(0)
    x, y = _planted(1400, strength=5.0)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    detector = DETECTORS[name]().fit(x[:400], shuffled[:400], max_iter=300)
    fitted = roc_auc_score(shuffled[:400], detector.decision_function(x[:400]))
    held_out = roc_auc_score(shuffled[400:], detector.decision_function(x[400:]))
    # It fitted the noise it was given (far outside chance on its own rows), and none of it carries over:
    # the held-out AUROC lies within 4 standard deviations of chance for scores unrelated to the labels.
    assert fitted - 0.5 > 4 * null_auroc_sd(shuffled[:400])
    assert abs(held_out - 0.5) < 4 * null_auroc_sd(shuffled[400:])
    if name == "logistic":  # the same optimum as scikit-learn's, so the same held-out figure
        reference = LogisticRegression(C=1 / (1e-2 * 400), tol=1e-10, max_iter=10_000).fit(x[:400], shuffled[:400])
        assert held_out == pytest.approx(roc_auc_score(shuffled[400:], reference.decision_function(x[400:])), abs=0.005)
        np.testing.assert_allclose(detector.coef_, reference.coef_[0], atol=2e-3 * np.abs(reference.coef_).max())


def test_l1_solution_satisfies_optimality_conditions() -> None:
    x, y = _planted(300, strength=2.0)
    l1 = 0.02
    detector = SparseL1Detector(l1=l1).fit(x, y, max_iter=5000, tol=1e-9)
    w = detector.coef_.double().numpy()
    grad, grad_bias = _smooth_gradient(x, y, w, detector.intercept_)
    zero = w == 0
    assert 0 < detector.active_features() < len(w) and zero.sum() == len(w) - detector.active_features()
    assert np.all(np.abs(grad[zero]) <= l1 + 1e-5)  # zero weights: the gradient fits inside the subgradient
    np.testing.assert_allclose(grad[~zero], -l1 * np.sign(w[~zero]), atol=1e-5)
    assert abs(grad_bias) < 1e-5


def test_group_lasso_keeps_the_planted_heads_and_is_optimal() -> None:
    x, y = _planted(400, heads=10, strength=2.5)
    x[:, 6 * HEAD_DIM] += 1.5 * y  # a second, weaker head
    l1 = 0.01
    detector = SparseL1Detector(l1=l1, group_lasso=True, head_dim=HEAD_DIM).fit(x, y, max_iter=5000, tol=1e-9)
    norms = detector.head_norms().numpy()
    assert {1, 6} <= set(np.flatnonzero(norms)) and detector.active_heads() == np.count_nonzero(norms) < 10
    grad = _smooth_gradient(x, y, detector.coef_.double().numpy(), detector.intercept_)[0].reshape(10, HEAD_DIM)
    w = detector.coef_.double().numpy().reshape(10, HEAD_DIM)
    weight = l1 * np.sqrt(HEAD_DIM)
    for head in range(10):
        if norms[head] == 0:
            assert np.linalg.norm(grad[head]) <= weight + 1e-5
        else:
            np.testing.assert_allclose(grad[head], -weight * w[head] / np.linalg.norm(w[head]), atol=1e-5)


@pytest.mark.filterwarnings("ignore:MLPDetector.fit stopped at max_iter")
def test_mlp_learns_what_a_linear_detector_cannot() -> None:
    torch.manual_seed(0)
    x = torch.randn(1200, 4)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()  # XOR of two signs
    linear = LogisticDetector(l2=1e-3).fit(x[:800], y[:800])
    mlp = MLPDetector(hidden=[32, 16], l2=1e-4).fit(x[:800], y[:800], max_iter=500)
    held_out = roc_auc_score(y[800:], linear.decision_function(x[800:]))
    assert abs(held_out - 0.5) < 4 * null_auroc_sd(y[800:])  # no linear direction separates XOR
    reference = LogisticRegression(C=1 / (1e-3 * 800), tol=1e-10, max_iter=10_000).fit(x[:800], y[:800])
    assert held_out == pytest.approx(roc_auc_score(y[800:], reference.decision_function(x[800:])), abs=0.005)
    assert roc_auc_score(y[800:], mlp.decision_function(x[800:])) > 0.95


def test_fit_learns_the_objective_minibatch_training_uses() -> None:
    x, y = _planted(200)
    detector = LogisticDetector(l2=0.1)
    assert detector.fit(x.half(), y) is detector and detector.n_iter_ > 0
    logits = x.half().float().numpy() @ detector.coef_.numpy() + detector.intercept_
    bce = np.mean(np.logaddexp(0, logits) - y.numpy() * logits)
    assert detector.loss_ == pytest.approx(bce + 0.05 * np.sum(detector.coef_.numpy() ** 2), rel=1e-5)
    proba = detector.predict_proba(x)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(200))
    torch.testing.assert_close(proba[:, 1], torch.sigmoid(detector.decision_function(x)))
    assert torch.equal(detector.predict(x), (detector.decision_function(x) >= 0).long())


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        (LogisticDetector(l2=-1.0), "l2 must be >= 0"),
        (SparseL1Detector(group_lasso=True), "group_lasso needs head_dim"),
        (SparseL1Detector(head_dim=7), "does not divide"),
        (MLPDetector(dropout=1.5), "dropout must be in"),
    ],
)
def test_arguments_are_stored_as_given_and_checked_when_fitting(detector: Detector, message: str) -> None:
    assert detector.clone().get_params() == detector.get_params()  # construction never rejects or rewrites
    x, y = _planted(50)
    with pytest.raises(ValueError, match=message):
        detector.fit(x, y)


def test_fit_rejects_one_class_labels() -> None:
    with pytest.raises(ValueError, match="only class 1"):
        LogisticDetector().fit(torch.randn(10, 3), torch.ones(10))


def test_detectors_are_configured_from_class_path() -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(Detector, "detector")
    config = parser.parse_args(
        ["--detector", '{"class_path": "sahs.models.detectors.SparseL1Detector", '
         '"init_args": {"l1": 0.05, "group_lasso": true, "head_dim": 8}}']
    )  # fmt: skip
    detector = parser.instantiate_classes(config).detector
    assert isinstance(detector, SparseL1Detector)
    assert detector.get_params() == {"l1": 0.05, "group_lasso": True, "head_dim": 8}


@pytest.mark.parametrize("cls", [LogisticDetector, SparseL1Detector, MLPDetector])
def test_every_argument_is_typed_and_documented(cls: type[Detector]) -> None:
    signature = inspect.signature(cls.__init__)
    arguments = [p for p in signature.parameters.values() if p.name != "self"]
    documented = {p.arg_name: p.description for p in parse(cls.__init__.__doc__).params}
    for argument in arguments:
        assert argument.annotation is not inspect.Parameter.empty and argument.default is not inspect.Parameter.empty
        assert documented.get(argument.name), f"{cls.__name__}.{argument.name} has no docstring"


@pytest.mark.parametrize("name", list(DETECTORS))
def test_fits_record_convergence_and_warn_when_max_iter_runs_out(name: str) -> None:
    torch.manual_seed(0)
    x, y = _planted(300, strength=2.0)
    detector = DETECTORS[name]().fit(x, y)  # a well-posed problem and the default budget
    assert detector.converged_ is True and 0 < detector.n_iter_ < 1000
    with pytest.warns(RuntimeWarning, match="stopped at max_iter=2"):
        short = DETECTORS[name]().fit(x, y, max_iter=2)
    assert short.converged_ is False and short.n_iter_ == 2


def _autograd_gradient(detector: Detector, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest entry of the gradient of ``detector.objective`` by autograd, over all parameters (no dropout)."""
    detector.eval()
    detector.zero_grad()
    detector.objective(x, y).backward()
    return torch.cat([p.grad.abs().flatten() for p in detector.parameters()]).max()


def test_mlp_without_hidden_layers_is_logistic_regression_to_its_stopping_rule() -> None:
    x, y = _planted(400, strength=1.0)
    x = x.double()
    l2 = 1e-2
    detector = MLPDetector(hidden=[], l2=l2).fit(x, y)
    gradient = float(_autograd_gradient(detector, x, y.double()))  # gtol 1e-4, or ftol stopped it first
    assert detector.converged_ and gradient <= detector.fit_tol
    # A gradient g puts the weights within about g / (smallest curvature) of the optimum, and the
    # curvature is at least l2 (the bias': mean p (1 - p), about 0.2 here).
    reference = LogisticRegression(C=1 / (l2 * 400), tol=1e-12, max_iter=10_000).fit(x, y)
    weight = detector.net[0].weight.detach()[0].numpy()
    np.testing.assert_allclose(weight, reference.coef_[0], atol=2 * gradient / l2)
    assert float(detector.net[0].bias.detach()) == pytest.approx(reference.intercept_[0], abs=2 * gradient / l2)


def _sklearn_mlp_from(detector: MLPDetector, x: torch.Tensor, y: torch.Tensor) -> MLPClassifier:
    """scikit-learn's lbfgs MLP on the same objective (alpha / n = l2), started from ``detector``'s weights."""
    linears = [m for m in detector.net if isinstance(m, torch.nn.Linear)]
    reference = MLPClassifier(hidden_layer_sizes=detector.hidden, solver="lbfgs", alpha=detector.l2 * len(y),
                              max_iter=1, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one iteration only initializes it
        reference.fit(x.numpy(), y.numpy())
    reference.coefs_ = [m.weight.detach().double().numpy().T.copy() for m in linears]
    reference.intercepts_ = [m.bias.detach().double().numpy().copy() for m in linears]
    reference.set_params(max_iter=20_000)
    return reference.fit(x.numpy(), y.numpy())


@pytest.mark.parametrize(("n", "hidden"), [(300, [16]), (30, [8, 6])])  # the second: more features than rows
def test_mlp_fit_reaches_sklearn_objective_from_the_same_start(n: int, hidden: list[int]) -> None:
    x, y = _planted(n, strength=1.0)
    x = x.double()  # float64, as scikit-learn: the same stopping rule (gtol, then ftol = 2.2e-9) applies
    torch.manual_seed(0)
    start = MLPDetector(hidden=hidden, l2=1e-2)
    start.build(x.shape[1])
    torch.manual_seed(0)  # fit builds the same layers again: the same starting weights
    detector = MLPDetector(hidden=hidden, l2=1e-2).fit(x, y, max_iter=5000)
    reference = _sklearn_mlp_from(start, x, y)
    with torch.no_grad():
        assert detector.loss_ == pytest.approx(float(detector.eval().objective(x, y.double())), rel=1e-9)
    # Iteration counts depend on the BLAS's rounding (thread count): the same order as scikit-learn's, not fewer.
    assert detector.converged_ and detector.n_iter_ <= 1.5 * reference.n_iter_
    # Both stop where a step gains less than ftol = 2.2e-9 relative. From the same start the two
    # line searches part ways at the ReLU kinks, so the minima found differ by up to about 1% of the loss.
    assert detector.loss_ <= 1.02 * reference.loss_


@pytest.mark.filterwarnings("ignore:lbfgs failed to converge")
def test_mlp_fit_matches_sklearn_mlp_on_held_out_rows() -> None:
    torch.manual_seed(0)
    x, y = _planted(1200, heads=4, strength=1.5)
    x[:, 0] = x[:, 0].abs() * (2 * y - 1) * 0.5 + x[:, 0]  # a nonlinear part on another head
    train, test = slice(0, 600), slice(600, None)
    l2 = 1e-2
    detector = MLPDetector(hidden=[32], l2=l2).fit(x[train], y[train])
    reference = MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", alpha=l2 * 600, max_iter=500, random_state=0)
    reference.fit(x[train].numpy(), y[train].numpy())
    ours = roc_auc_score(y[test], detector.decision_function(x[test]))
    assert ours == pytest.approx(roc_auc_score(y[test], reference.predict_proba(x[test].numpy())[:, 1]), abs=0.02)
    assert detector.loss_ <= 1.1 * reference.loss_  # the same objective (alpha / n = l2), minimized as far


def test_l1_fit_matches_sklearn_saga() -> None:
    x, y = _planted(400, heads=3, strength=1.5)
    x = x.double()
    l1 = 0.02
    detector = SparseL1Detector(l1=l1).fit(x, y, tol=1e-8)
    reference = LogisticRegression(l1_ratio=1, C=1 / (l1 * 400), solver="saga", tol=1e-10, max_iter=100_000)
    reference.fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(detector.coef_.numpy(), reference.coef_[0], atol=1e-5)
    assert detector.intercept_ == pytest.approx(reference.intercept_[0], abs=1e-5)
    assert set(np.flatnonzero(detector.coef_.numpy())) == set(np.flatnonzero(np.abs(reference.coef_[0]) > 1e-6))
