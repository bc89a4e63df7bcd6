"""Detectors: small heads on the concatenated safety-head activations.

Every detector is an ``nn.Module`` whose layers are created by ``build(in_features)`` once the
DataModule knows how many features the selected heads give, so that a YAML file can name the
detector (``class_path`` / ``init_args``) before any data exists. The constructor arguments are the
config: stored as given and validated in ``build``.

For small problems the detectors also follow the scikit-learn contract: ``fit(X, y)`` minimizes the
full-batch objective (mean BCE + ``penalty()``, the loss minibatch training uses) and returns the
detector; ``decision_function`` gives logits and ``predict_proba`` probabilities. What ``fit``
learns beyond the layers' weights (``n_iter_``, ``loss_``, ``converged_``) ends in ``_``. Each
solver has one stopping rule, stated in its ``_minimize``; the solvers are in ``sahs.models.solvers``.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from sahs.eval.logistic import solve_lbfgs
from sahs.models.solvers import MLPObjective, fista, lbfgs


def _check_xy(X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.as_tensor(X)
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32  # fp16 caches fit in fp32
    X = X.to(dtype)
    y = torch.as_tensor(y, device=X.device)
    if X.ndim != 2:
        raise ValueError(f"X must be [n, features], got shape {tuple(X.shape)}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},), got {tuple(y.shape)}")
    if not torch.isfinite(X.sum()) and not torch.isfinite(X).all():  # the sum is the quick test
        raise ValueError("X contains NaN or infinite values")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("y must be 0 (benign) or 1 (malicious)")
    if y.min() == y.max():
        raise ValueError(f"y holds only class {int(y[0])}; fitting needs benign and malicious rows")
    return X, y.to(dtype)


class Detector(nn.Module):
    """Base class: ``build`` creates the layers, ``forward`` returns one logit per row."""

    # A non-smooth penalty is applied by ``proximal_step`` after each optimizer step, not by autograd.
    proximal = False

    def __init__(self) -> None:
        super().__init__()
        self.in_features: int | None = None

    @property
    def built(self) -> bool:
        return self.in_features is not None

    def build(self, in_features: int) -> None:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """Regularization added to the loss; zero unless the detector defines one."""
        return torch.zeros((), device=next(self.parameters()).device)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments as stored (scikit-learn's ``get_params``)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def clone(self) -> Self:
        """A new, unbuilt detector with the same constructor arguments (``sklearn.base.clone``)."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def objective(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean BCE on the logits plus ``penalty()``: what ``fit`` minimizes."""
        return F.binary_cross_entropy_with_logits(self(X), y) + self.penalty()

    # The stopping tolerance ``fit`` uses when given none; see each ``_minimize`` for its rule.
    fit_tol = 1e-6

    def fit(self, X: Any, y: Any, max_iter: int = 1000, tol: float | None = None) -> Self:
        """Build for ``X.shape[1]`` features and minimize the full-batch objective.

        Sets ``n_iter_`` (iterations taken), ``loss_`` (the objective reached) and ``converged_``
        (False when ``max_iter`` ran out before the solver's stopping rule held, with a
        ``RuntimeWarning``).

        Args:
            X: Features ``[n, features]``; float16 input is fitted in float32.
            y: Labels ``[n]``, 0 benign and 1 malicious.
            max_iter: Most solver iterations.
            tol: Tolerance of the solver's stopping rule (see the detector's ``_minimize``); None:
                the detector's ``fit_tol``.
        """
        X, y = _check_xy(X, y)
        tol = self.fit_tol if tol is None else tol
        if max_iter < 1 or not tol >= 0:
            raise ValueError(f"max_iter must be >= 1 and tol >= 0, got {max_iter}, {tol}")
        self.build(X.shape[1])
        self.to(device=X.device, dtype=X.dtype)
        was_training = self.training
        self.eval()  # dropout off: the line search needs a deterministic objective
        self._minimize(X, y, max_iter, tol)
        self.train(was_training)
        if not self.converged_:
            warnings.warn(f"{type(self).__name__}.fit stopped at max_iter={max_iter} before its stopping rule held "
                          f"(tol={tol:g}): raise max_iter or tol", RuntimeWarning, stacklevel=2)
        return self

    def _minimize(self, X: torch.Tensor, y: torch.Tensor, max_iter: int, tol: float) -> None:
        """L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) over all parameters.

        Stops when the largest gradient entry is at most ``tol`` or a step changes the loss or any
        parameter by less than 1e-9 (both converged), or after ``max_iter`` iterations.
        """
        params = list(self.parameters())
        optimizer = torch.optim.LBFGS(
            params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = self.objective(X, y)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.n_iter_ = int(optimizer.state[params[0]].get("n_iter", 0))
        self.converged_ = self.n_iter_ < max_iter
        with torch.no_grad():
            self.loss_ = float(self.objective(X, y))

    def _check_fitted_input(self, X: Any) -> torch.Tensor:
        if not self.built:
            raise RuntimeError(f"{type(self).__name__} is not built: call fit or build first")
        weight = next(self.parameters())
        X = torch.as_tensor(X).to(device=weight.device, dtype=weight.dtype)
        if X.ndim != 2 or X.shape[1] != self.in_features:
            raise ValueError(f"X must be [n, {self.in_features}], got shape {tuple(X.shape)}")
        return X

    @torch.no_grad()
    def decision_function(self, X: Any) -> torch.Tensor:
        """Logits ``[n]``: higher means more likely malicious."""
        X = self._check_fitted_input(X)
        was_training = self.training
        self.eval()
        logits = self(X)
        self.train(was_training)
        return logits

    def predict_proba(self, X: Any) -> torch.Tensor:
        """Probabilities ``[n, 2]`` of benign (column 0) and malicious (column 1)."""
        malicious = torch.sigmoid(self.decision_function(X))
        return torch.stack([1 - malicious, malicious], dim=1)

    def predict(self, X: Any, threshold: float = 0.0) -> torch.Tensor:
        """Labels ``[n]``: 1 where the logit reaches ``threshold``."""
        return (self.decision_function(X) >= threshold).long()


class _LinearDetector(Detector):
    """One linear layer on the concatenated heads (logistic regression)."""

    def _check_params(self, in_features: int) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")

    def build(self, in_features: int) -> None:
        self._check_params(in_features)
        self.in_features = in_features
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, features] -> [batch]
        return self.linear(x).squeeze(-1)

    @property
    def coef_(self) -> torch.Tensor:
        return self.linear.weight.detach()[0]  # [features]

    @property
    def intercept_(self) -> float:
        return float(self.linear.bias.detach()[0])


class LogisticDetector(_LinearDetector):
    """The paper's detector: one linear layer on the concatenated heads (logistic regression)."""

    def __init__(self, l2: float = 0.0) -> None:
        """
        Args:
            l2: L2 penalty on the weights (not the bias), added to the mean BCE loss as ``l2/2 * ||w||^2``.
        """
        super().__init__()
        self.l2 = l2

    def _check_params(self, in_features: int) -> None:
        super()._check_params(in_features)
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.l2 * self.linear.weight.pow(2).sum()

    def _minimize(self, X: torch.Tensor, y: torch.Tensor, max_iter: int, tol: float) -> None:
        """L-BFGS with an exact line search along the logits, no autograd (``solve_lbfgs``).

        Stops when the largest gradient entry is at most ``tol`` (scikit-learn's lbfgs rule) or a
        step moves no parameter by more than 1e-9 (both converged), or after ``max_iter`` steps.
        """
        fit = solve_lbfgs(X, y, l2=self.l2, max_iter=max_iter, tol=tol)
        with torch.no_grad():
            self.linear.weight.copy_(fit.weight[None])
            self.linear.bias.copy_(fit.bias[None])
        self.n_iter_, self.loss_, self.converged_ = int(fit.n_iter), float(fit.loss), bool(fit.converged)


class SparseL1Detector(_LinearDetector):
    """Logistic regression with an L1 penalty, or a group lasso that keeps or drops whole heads.

    ``fit`` runs FISTA (accelerated proximal gradient with backtracking and restarts), whose
    soft-thresholding step sets weights exactly to zero, so ``active_heads()`` counts exact zeros.
    It stops when the largest entry of the gradient mapping is at most ``tol`` (1e-6).
    Minibatch training (``DetectorModule``) is proximal SGD: a plain SGD step on the BCE, then
    ``proximal_step`` at that step's learning rate, which gives exact zeros too.
    """

    def __init__(self, l1: float = 1e-3, group_lasso: bool = False, head_dim: int | None = None) -> None:
        """
        Args:
            l1: Penalty strength: ``l1 * ||w||_1``, or ``l1 * sqrt(head_dim) * sum_h ||w_h||_2`` with group_lasso.
            group_lasso: Penalize each head's weight block as a group, so that whole heads drop out.
            head_dim: Features per head: the concatenated features are consecutive blocks of this size.
        """
        super().__init__()
        self.l1 = l1
        self.group_lasso = group_lasso
        self.head_dim = head_dim

    def _check_params(self, in_features: int) -> None:
        super()._check_params(in_features)
        if not self.l1 >= 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1}")
        if self.group_lasso and self.head_dim is None:
            raise ValueError("group_lasso needs head_dim: the size of each head's block of features")
        if self.head_dim is not None and (self.head_dim < 1 or in_features % self.head_dim):
            raise ValueError(f"head_dim={self.head_dim} does not divide in_features={in_features}")

    def _group_weight(self) -> float:
        return self.l1 * math.sqrt(self.head_dim) if self.group_lasso else self.l1

    def penalty(self) -> torch.Tensor:
        return self._penalty_of(self.linear.weight[0])

    def _penalty_of(self, weight: torch.Tensor) -> torch.Tensor:  # [features] -> []
        if self.group_lasso:
            return self._group_weight() * weight.view(-1, self.head_dim).norm(dim=1).sum()
        return self.l1 * weight.abs().sum()

    proximal = True

    @torch.no_grad()
    def proximal_step(self, step: float) -> None:
        """Shrink the weights after a plain gradient step of size ``step`` (exact only for that step's own rate)."""
        self.linear.weight[0] = self._prox(self.linear.weight[0], step)

    def _prox(self, weight: torch.Tensor, step: float) -> torch.Tensor:
        """Proximal map of ``step * penalty``: soft-thresholding, per entry or per head block."""
        threshold = step * self._group_weight()
        if not self.group_lasso:
            return weight.sign() * (weight.abs() - threshold).clamp_min(0)
        blocks = weight.view(-1, self.head_dim)  # [heads, head_dim]
        norms = blocks.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        return (blocks * (1 - threshold / norms).clamp_min(0)).reshape(-1)

    def _minimize(self, X: torch.Tensor, y: torch.Tensor, max_iter: int, tol: float) -> None:
        """FISTA in float64 (``solvers.fista``): exact zeros from the proximal map, a tight KKT residual."""
        result = fista(X.double(), y.double(), self._prox, lambda weight: float(self._penalty_of(weight)),
                       max_iter=max_iter, tol=tol)
        with torch.no_grad():
            self.linear.weight.copy_(result.theta[None, :-1])
            self.linear.bias.copy_(result.theta[-1:])
        self.n_iter_, self.loss_, self.converged_ = result.n_iter, result.loss, result.converged

    def head_norms(self) -> torch.Tensor:
        """L2 norm of each head's weight block ``[heads]``."""
        if self.head_dim is None:
            raise ValueError("head_dim is needed to group the features by head")
        return self.coef_.view(-1, self.head_dim).norm(dim=1)

    def active_heads(self, tol: float = 0.0) -> int:
        """Heads with any weight above ``tol`` in absolute value (exact zeros after ``fit``)."""
        if self.head_dim is None:
            raise ValueError("head_dim is needed to group the features by head")
        return int((self.coef_.view(-1, self.head_dim).abs().amax(dim=1) > tol).sum())

    def active_features(self, tol: float = 0.0) -> int:
        """Weights above ``tol`` in absolute value."""
        return int((self.coef_.abs() > tol).sum())


class MLPDetector(Detector):
    """A small MLP (ReLU, dropout) on the concatenated heads.

    ``fit`` runs L-BFGS (``solvers.lbfgs``) with scikit-learn's ``MLPClassifier(solver="lbfgs")``
    stopping rule and default: the largest gradient entry at most ``tol = 1e-4``.
    """

    fit_tol = 1e-4

    def __init__(self, hidden: list[int] = [64], dropout: float = 0.1, l2: float = 1e-3) -> None:  # noqa: B006
        """
        Args:
            hidden: Width of each hidden layer (read, never modified).
            dropout: Dropout after each hidden layer in minibatch training; full-batch ``fit`` runs without it.
            l2: L2 penalty on all weight matrices (not biases), ``l2/2 * sum ||W||^2``.
        """
        super().__init__()
        self.hidden = hidden
        self.dropout = dropout
        self.l2 = l2

    def build(self, in_features: int) -> None:
        if in_features < 1 or any(width < 1 for width in self.hidden):
            raise ValueError(f"in_features and hidden widths must be positive, got {in_features}, {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        for width_in, width_out in zip([in_features, *self.hidden], self.hidden):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(self.dropout)]
        layers.append(nn.Linear(([in_features, *self.hidden])[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, features] -> [batch]
        return self.net(x).squeeze(-1)

    def penalty(self) -> torch.Tensor:
        weights = [m.weight.pow(2).sum() for m in self.net if isinstance(m, nn.Linear)]
        return 0.5 * self.l2 * torch.stack(weights).sum()

    def _minimize(self, X: torch.Tensor, y: torch.Tensor, max_iter: int, tol: float) -> None:
        """L-BFGS on all weights and biases with hand-written backpropagation (``solvers.lbfgs``).

        Stops when the largest gradient entry is at most ``tol``, or when a step lowers the objective
        by no more than the arithmetic resolves (both converged), or after ``max_iter`` steps.
        """
        linears = [module for module in self.net if isinstance(module, nn.Linear)]
        first = linears[0].weight.detach()
        basis = None
        if X.shape[1] > X.shape[0]:
            # More features than rows: the loss sees the first layer only through the row space of X
            # and the penalty is zero on the rest at the optimum, so fit in that space (X = R^T Q^T,
            # W Q for W): the same objective with a first layer of n, not d, inputs.
            basis, triangle = torch.linalg.qr(X.T)  # [d, n], [n, n]
            X, first = triangle.T, first @ basis
        parameters = [first, linears[0].bias.detach(), *(p.detach() for m in linears[1:] for p in (m.weight, m.bias))]
        theta = torch.cat([p.reshape(-1) for p in parameters])
        shapes = [tuple(first.shape)] + [tuple(m.weight.shape) for m in linears[1:]]
        objective = MLPObjective(X, y, shapes, self.l2)
        result = lbfgs(objective.value, objective.gradient, theta, max_iter=max_iter, tol=tol)
        with torch.no_grad():
            for index, (module, (weight, bias)) in enumerate(zip(linears, objective.unpack(result.theta))):
                module.weight.copy_(weight @ basis.T if index == 0 and basis is not None else weight)
                module.bias.copy_(bias)
        self.n_iter_, self.loss_, self.converged_ = result.n_iter, result.loss, result.converged
