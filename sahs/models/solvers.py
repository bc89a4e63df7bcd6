"""Full-batch solvers of the detectors' ``fit``: L-BFGS for the MLP, FISTA for the L1 and group-lasso fits.

Both work on one flat parameter vector with hand-written gradients (no autograd graph, no optimizer
object), so an iteration costs its matrix products and little else. Each has one stopping rule,
stated in its docstring, and reports whether it met it (``Result.converged``) or ran out of
iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Result:
    """Where a solver stopped: the parameters, the objective there, iterations, and whether its rule was met."""

    theta: torch.Tensor
    loss: float
    n_iter: int
    converged: bool


# scipy's L-BFGS-B default (``factr = 1e7`` times float64's epsilon), as scikit-learn's lbfgs fits use.
FTOL = 1e7 * torch.finfo(torch.float64).eps


def _ftol(dtype: torch.dtype) -> float:
    """Relative objective decrease that ends L-BFGS: scipy's default, or a few units of roundoff where coarser."""
    return max(FTOL, 4 * torch.finfo(dtype).eps)


def lbfgs(
    value: Callable[[torch.Tensor], float],
    gradient: Callable[[], torch.Tensor],
    theta: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int = 10,
) -> Result:
    """Minimize a smooth function by L-BFGS with a backtracking (Armijo) line search.

    ``value(theta)`` returns the objective and keeps what ``gradient()`` then needs for the gradient
    at that same point, so that rejected trial points cost a forward pass only. The rules of
    scikit-learn's lbfgs fits (scipy's L-BFGS-B): converged when the largest gradient entry is at
    most ``tol`` (``gtol``), or when a step lowers the objective by at most ``ftol * max(|f|, 1)``
    with scipy's default ``ftol`` = 2.2e-9, raised to four units of roundoff in float32 (4.8e-7),
    or when no step the arithmetic resolves lowers it. Reaching ``max_iter`` steps is not converged.
    """
    loss = value(theta)
    grad = gradient()
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), newest last
    ftol = _ftol(theta.dtype)
    precision = 4 * torch.finfo(theta.dtype).eps
    iteration, converged = 0, False
    while True:
        if float(grad.abs().max()) <= tol:
            converged = True
            break
        if iteration >= max_iter:
            break
        direction = -grad  # the two-loop recursion: direction = -H grad
        alphas = []
        for s, change, rho in reversed(pairs):
            alpha = rho * float(s.dot(direction))
            direction = direction.add(change, alpha=-alpha)
            alphas.append(alpha)
        if pairs:
            s, change, rho = pairs[-1]
            direction = direction.mul(1 / (rho * float(change.dot(change))))  # initial scaling s.y / y.y
        for (s, change, rho), alpha in zip(pairs, reversed(alphas)):
            direction = direction.add(s, alpha=alpha - rho * float(change.dot(direction)))
        slope = float(grad.dot(direction))
        if slope >= 0 or not math.isfinite(slope):  # not downhill: restart from the gradient
            pairs.clear()
            direction, slope = -grad, -float(grad.dot(grad))
        step = 1.0 if pairs else min(1.0, 1.0 / float(grad.abs().sum()))  # first step: a unit L1 move
        while True:  # backtracking until the Armijo condition holds
            new_loss = value(theta + step * direction)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            if not math.isfinite(new_loss):
                step *= 0.1
                continue
            fitted = -slope * step * step / (2 * (new_loss - loss - slope * step))  # minimizer of the quadratic fit
            step = min(max(fitted, 0.1 * step), 0.5 * step)
            if step * float(direction.abs().max()) <= precision * (1 + float(theta.abs().max())):
                new_loss = None  # no step the arithmetic can resolve lowers the objective: done
                break
        iteration += 1
        if new_loss is None:
            value(theta)  # the state ``gradient`` reads is the last accepted point's
            converged = True
            break
        s = step * direction
        theta = theta + s
        new_grad = gradient()
        change = new_grad - grad
        curve = float(change.dot(s))
        if curve > 1e-10 * float(change.dot(change)):  # keep the pair only where it adds positive curvature
            pairs = [*pairs[len(pairs) - history + 1 :], (s, change, 1 / curve)]
        decrease = loss - new_loss
        loss, grad = new_loss, new_grad
        if decrease <= ftol * max(abs(loss), 1.0):
            converged = True
            break
    return Result(theta, loss, iteration, converged)


class MLPObjective:
    """Mean BCE of a ReLU MLP plus ``l2/2 * sum ||W||^2`` (weight matrices only), as a function of one flat vector.

    ``shapes`` lists each linear layer's ``(out, in)``; the vector holds each layer's weight
    (row-major) then its bias, layer by layer. ``value`` runs the forward pass and keeps its
    activations; ``gradient`` backpropagates through them by hand.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, shapes: list[tuple[int, int]], l2: float) -> None:
        self.X, self.y, self.shapes, self.l2 = X, y, shapes, l2
        self.n = X.shape[0]
        self._cache: tuple | None = None

    def unpack(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers, offset = [], 0
        for out_features, in_features in self.shapes:
            weight = theta[offset : offset + out_features * in_features].view(out_features, in_features)
            offset += out_features * in_features
            layers.append((weight, theta[offset : offset + out_features]))
            offset += out_features
        return layers

    def value(self, theta: torch.Tensor) -> float:
        layers = self.unpack(theta)
        activations = [self.X]
        for weight, bias in layers[:-1]:
            activations.append(torch.addmm(bias, activations[-1], weight.T).clamp_min_(0))
        weight, bias = layers[-1]
        logits = torch.addmv(bias, activations[-1], weight[0])
        bce = F.binary_cross_entropy_with_logits(logits, self.y)
        penalty = sum(float(w.pow(2).sum()) for w, _ in layers)
        self._cache = (theta, layers, activations, logits)
        return float(bce) + 0.5 * self.l2 * penalty

    def gradient(self) -> torch.Tensor:
        theta, layers, activations, logits = self._cache
        grad = torch.empty_like(theta)
        parts = self.unpack(grad)
        delta = (torch.sigmoid(logits) - self.y).div_(self.n)[:, None]  # d loss / d output [n, 1]
        for index in range(len(layers) - 1, -1, -1):
            weight, _ = layers[index]
            grad_weight, grad_bias = parts[index]
            torch.mm(delta.T, activations[index], out=grad_weight).add_(weight, alpha=self.l2)
            torch.sum(delta, 0, out=grad_bias)
            if index:
                delta = (delta @ weight).mul_(activations[index] > 0)  # through the ReLU of the layer below
        return grad


def fista(
    X: torch.Tensor,
    y: torch.Tensor,
    prox: Callable[[torch.Tensor, float], torch.Tensor],
    penalty: Callable[[torch.Tensor], float],
    *,
    max_iter: int,
    tol: float,
) -> Result:
    """Minimize ``mean BCE(X w + b, y) + penalty(w)`` by FISTA: the L1 and group-lasso fits.

    ``prox(w, step)`` is the proximal map of ``step * penalty``; the bias is not penalized. Each
    step is a proximal gradient step from the extrapolated point with a backtracked step size
    ``1 / L`` that also shrinks again when the curvature allows (local, not global, Lipschitz
    estimates), momentum restarted whenever the objective rises (O'Donoghue & Candes). The
    logits move linearly, so an iteration costs two matrix-vector products: ``X w`` at the new
    point and ``X^T r`` at the extrapolated one. Stops when the largest entry of the gradient
    mapping ``L * (point - new point)`` (zero exactly at the optimum; the projected gradient's
    analogue) is at most ``tol``; ``max_iter`` iterations otherwise (not converged).

    Returns ``theta = [w, b]`` ``[d + 1]``.
    """
    n, d = X.shape
    ybar = min(max(float(y.mean()), 1e-6), 1 - 1e-6)
    vector = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(X)
    mean = X.mean(0)
    for _ in range(20):  # power iteration: curvature bound of the mean logistic loss, from the centered design
        vector = X.T @ (X @ vector) - n * mean * mean.dot(vector)
        vector /= vector.norm()
    lipschitz = max(0.25 * float(vector.dot(X.T @ (X @ vector) - n * mean * mean.dot(vector))) / n, 1e-12)
    weight = X.new_zeros(d)
    bias = math.log(ybar / (1 - ybar))
    logits = X.new_full((n,), bias)
    point_weight, point_bias, point_logits = weight, bias, logits  # the extrapolated point
    momentum, objective = 1.0, math.inf
    iteration, converged = 0, False
    while iteration < max_iter:
        iteration += 1
        residual = torch.sigmoid(point_logits) - y
        loss = float(F.binary_cross_entropy_with_logits(point_logits, y))
        grad_weight, grad_bias = X.T @ residual / n, float(residual.mean())
        lipschitz *= 0.8  # try a longer step than last time: the curvature near the optimum is often smaller
        while True:  # backtracking: the quadratic model must bound the loss at the new point
            new_weight = prox(point_weight - grad_weight / lipschitz, 1 / lipschitz)
            new_bias = point_bias - grad_bias / lipschitz
            step_weight, step_bias = new_weight - point_weight, new_bias - point_bias
            new_logits = torch.addmv(X.new_full((n,), new_bias), X, new_weight)
            new_loss = float(F.binary_cross_entropy_with_logits(new_logits, y))
            squared = float(step_weight.dot(step_weight)) + step_bias**2
            model = loss + float(grad_weight.dot(step_weight)) + grad_bias * step_bias + 0.5 * lipschitz * squared
            if new_loss <= model + 1e-12 * max(1.0, abs(loss)):
                break
            lipschitz *= 2
        gradient_map = lipschitz * max(float(step_weight.abs().max()), abs(step_bias))
        new_objective = new_loss + penalty(new_weight)
        if new_objective > objective:  # adaptive restart: drop momentum when it overshoots
            momentum = 1.0
        objective = min(objective, new_objective)
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        beta = (momentum - 1) / next_momentum
        point_weight = new_weight + beta * (new_weight - weight)
        point_bias = new_bias + beta * (new_bias - bias)
        point_logits = new_logits + beta * (new_logits - logits)
        weight, bias, logits, momentum = new_weight, new_bias, new_logits, next_momentum
        if gradient_map <= tol:
            converged = True
            break
    theta = torch.cat([weight, weight.new_tensor([bias])])
    return Result(theta, float(F.binary_cross_entropy_with_logits(logits, y)) + penalty(weight), iteration, converged)
