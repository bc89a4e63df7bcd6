"""Full-batch L2-regularized logistic regression, fast: many small problems at once, or one large one.

Both solvers minimize ``mean BCE(x w + b, y) + l2/2 * ||w||^2`` (bias unpenalized) and share one
idea: along a search direction the logits move linearly (``z + t * q`` with ``q = x d``), so after
one matrix-vector product the exact line search costs only elementwise work on ``[n]``. An
iteration is two passes over the data (``x d`` and the gradient ``x^T r``), as in L-BFGS, and each
step is the best one along its direction.

- ``solve_probes``: ``G`` independent problems ``x [G, n, D]`` with small ``D`` (one per attention
  head). One batched Gram product gives each problem the curvature bound ``[x, 1]^T [x, 1] / 4n``
  (Bohning); its Cholesky factor preconditions a nonlinear conjugate gradient. Problems whose
  probabilities stay near 1/2 (most heads) converge in about three steps; the rest switch to
  Newton steps.
- ``solve_lbfgs``: one problem with many features (a detector on the concatenated heads): L-BFGS
  with the same exact line search, no Gram matrix.

Features are centered implicitly (``x - mean`` is never formed); ``solve_probes`` centers in place
the problems whose means dwarf their spread, where float32 sums would cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A tiny ridge on the linear systems keeps the factorizations safe; the gradient is exact, so it
# changes the steps, not the optimum.
_DAMPING = 1e-6
# Above this |mean| / std the implicitly centered float32 sums lose digits: center explicitly.
_MEAN_TO_STD = 30.0


@dataclass
class Fit:
    """What a solve found: weights and bias on the features as given, iterations, final objective."""

    weight: torch.Tensor  # [G, D] ([D] from solve_lbfgs)
    bias: torch.Tensor  # [G] ([])
    n_iter: torch.Tensor  # [G] ([])
    loss: torch.Tensor  # [G] ([])
    converged: torch.Tensor  # [G] ([]): the stopping rule held within max_iter


def line_search(z, q, y, slope, curvature, wd, dd, l2: float, steps: int = 10):
    """Per row, the step ``t`` minimizing ``phi(t) = mean BCE(z + t q, y) + l2/2 ||w + t dw||^2``.

    ``z``, ``q`` are ``[G, n]`` logits and their direction; ``slope``, ``curvature`` are ``phi'(0)``
    and ``phi''(0)``; ``wd = w . dw``, ``dd = dw . dw``. Starts at the quadratic model's minimizer,
    then takes 1-D Newton steps kept inside the bracket of the minimum (``phi`` is convex) until
    none would move by 0.1%. Returns ``t`` and, at the new point, the logits, probabilities,
    residuals ``p - y`` and curvature weights ``p (1 - p)``. A zero direction gets ``t = 0``.
    """
    n = z.shape[1]
    moving = curvature > 0
    t = torch.where(moving, -slope / curvature.clamp_min(1e-30), torch.zeros_like(slope))
    low, high = torch.zeros_like(t), torch.full_like(t, math.inf)
    q2 = q * q
    for attempt in range(steps):
        z_new = torch.addcmul(z, t[:, None], q)
        p = torch.sigmoid(z_new)
        residual = p - y
        weight = torch.addcmul(p, p, p, value=-1)  # p (1 - p)
        if attempt == steps - 1:
            break
        slope = torch.linalg.vecdot(residual, q) / n + l2 * (wd + t * dd)
        curvature = torch.linalg.vecdot(weight, q2) / n + l2 * dd
        proposal = t - slope / curvature.clamp_min(1e-30)
        if bool(((proposal - t).abs() <= 1e-3 * t.abs()).logical_or_(~moving).all()):
            break
        low = torch.where(slope < 0, t, low)
        high = torch.where(slope > 0, t, high)
        inside = (proposal > low) & (proposal < high)
        bisect = torch.where(high.isfinite(), (low + high) / 2, 2 * t)
        t = torch.where(moving, torch.where(inside, proposal, bisect), t)
    return t, z_new, p, residual, weight


def objective(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean BCE of logits ``z [..., n]`` plus ``l2/2 ||weight||^2`` per problem."""
    bce = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").mean(-1)
    return bce + 0.5 * l2 * weight.pow(2).sum(-1)


def _cholesky(system: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of a batch of symmetric positive definite matrices (more damping where one is not)."""
    scale = system.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # [G]
    eye = torch.eye(system.shape[1], device=system.device, dtype=system.dtype)
    for jitter in (0.0, 1e-6, 1e-4, 1e-2):
        factor, info = torch.linalg.cholesky_ex(system + (jitter * scale)[:, None, None] * eye if jitter else system)
        if not info.any():
            return factor
    raise ValueError("a logistic regression's curvature is not positive definite: features are degenerate")


def _system(centered: torch.Tensor, cross: torch.Tensor, corner: torch.Tensor, inv: torch.Tensor,
            l2: float) -> torch.Tensor:
    """``[[S C S + l2 I, S c], [c^T S, corner]]`` plus damping, with ``S = diag(inv)``.

    ``C = xc^T W xc`` ``[G, D, D]`` (overwritten), ``c = xc^T w`` ``[G, D]`` and ``corner = sum(w)``
    ``[G]`` for the centered features ``xc`` and row weights ``w``: the weights-and-bias curvature
    of the scaled features.
    """
    G, D, _ = centered.shape
    out = centered.new_empty(G, D + 1, D + 1)
    torch.mul(centered.mul_(inv[:, :, None]), inv[:, None, :], out=out[:, :D, :D])
    out[:, :D, D] = out[:, D, :D] = cross * inv
    out[:, D, D] = corner
    ridge = torch.full((D + 1,), l2 + _DAMPING, device=out.device, dtype=out.dtype)
    ridge[D] = _DAMPING
    out.diagonal(dim1=1, dim2=2).add_(ridge)
    return out


class _Probes:
    """Iterates of the problems still moving; ``keep`` drops converged ones, compacting ``x`` in place."""

    _ROWS = ("index", "shift", "inv", "factor", "stretch", "theta", "z", "p", "residual", "weight", "grad",
             "direction", "grad_old", "pre_old")

    def __init__(self, x, y, l2: float, standardize: bool, mean: torch.Tensor, xty: torch.Tensor) -> None:
        G, n, D = x.shape
        self.x, self.y, self.l2, self.n = x, y, l2, n
        self.index = torch.arange(G, device=x.device)
        self.shift = mean.clone()  # what x still has to lose to be centered
        gram = torch.bmm(x.transpose(1, 2), x)  # [G, D, D]: the one dense matrix product
        variance = gram.diagonal(dim1=1, dim2=2) / n - mean * mean
        for g in (mean.abs() > _MEAN_TO_STD * variance.clamp_min(0).sqrt()).any(1).nonzero().flatten().tolist():
            x[g].sub_(mean[g])
            self.shift[g] = 0
            gram[g] = x[g].T @ x[g]
            variance[g] = gram[g].diagonal() / n
        scale = variance.clamp_min(0).sqrt().clamp_min(1e-6) if standardize else x.new_ones(G, D)
        self.inv = 1 / scale  # population std, as StandardScaler
        # The bound: the Gram matrix of the centered features over 4n; centered, they decouple from the bias.
        centered = gram.addcmul_(self.shift[:, :, None], self.shift[:, None, :], value=-n).div_(4 * n)
        self.factor = _cholesky(_system(centered, x.new_zeros(G, D), x.new_full((G,), 0.25), self.inv, l2))
        ybar = y.mean().clamp(1e-6, 1 - 1e-6)
        self.theta = x.new_zeros(G, D + 1)  # weights on the scaled, centered features, then the bias
        self.theta[:, D] = torch.log(ybar / (1 - ybar))  # the optimal bias while the weights are 0
        self.z = self.theta[:, D:].expand(G, n).contiguous()  # logits [G, n]
        self.p = torch.full_like(self.z, float(ybar))
        self.residual = self.p - y
        self.weight = self.p * (1 - self.p)
        # At the start every residual is mean(y) - y: the gradient is -xc^T y / n.
        self.grad = torch.zeros_like(self.theta)
        self.grad[:, :D] = -(xty - mean * y.sum()) * self.inv / n
        self.direction = self.grad_old = self.pre_old = None
        # How much the preconditioner overstates the curvature along the last step (at least 1): a
        # step under the bound understates the step to the optimum by about this factor.
        self.stretch = x.new_ones(G)

    def keep(self, rows: torch.Tensor) -> None:
        for target, source in enumerate(rows.tolist()):  # rows ascend, so a copy never overwrites a kept row
            if target != source:
                self.x[target].copy_(self.x[source])
        self.x = self.x[: len(rows)]
        for name in self._ROWS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])

    def newton(self) -> None:
        """Precondition with the Hessian at the current point: the next step is a Newton step."""
        w = self.weight / self.n  # [G, n]
        scaled = self.x * w.sqrt()[:, :, None]
        xx = torch.bmm(scaled.transpose(1, 2), scaled)
        xw, sw, shift = torch.bmm(w[:, None, :], self.x)[:, 0], w.sum(1), self.shift
        cross = xw - shift * sw[:, None]  # xc^T w, with xc = x - shift
        centered = xx.addcmul_(xw[:, :, None], shift[:, None, :], value=-1)
        centered.addcmul_(shift[:, :, None], cross[:, None, :], value=-1)
        self.factor = _cholesky(_system(centered, cross, sw, self.inv, self.l2))
        self.direction = None
        self.stretch = torch.ones_like(self.stretch)

    def preconditioned(self) -> torch.Tensor:
        return torch.cholesky_solve(self.grad[:, :, None], self.factor)[:, :, 0]

    def step(self, pre: torch.Tensor) -> None:
        """Conjugate-gradient step (Polak-Ribiere+, restarted when not downhill) with exact line search."""
        D = self.x.shape[2]
        direction = -pre
        if self.direction is not None:
            change = torch.linalg.vecdot(self.grad, pre - self.pre_old)
            beta = change / torch.linalg.vecdot(self.grad_old, self.pre_old).clamp_min(1e-30)
            direction += beta.clamp_min(0)[:, None] * self.direction
        slope = torch.linalg.vecdot(self.grad, direction)
        uphill = slope >= 0
        if uphill.any():
            direction[uphill] = -pre[uphill]
            slope = torch.linalg.vecdot(self.grad, direction)
        dw = direction[:, :D]
        u = dw * self.inv  # the direction on the features as stored
        offset = direction[:, D] - torch.linalg.vecdot(u, self.shift)
        q = torch.bmm(u[:, None, :], self.x.transpose(1, 2))[:, 0] + offset[:, None]  # [G, n]
        dd = torch.linalg.vecdot(dw, dw)
        curvature = torch.linalg.vecdot(self.weight, q * q) / self.n + self.l2 * dd
        self.stretch = (-slope / curvature.clamp_min(1e-30)).clamp_min(1)
        wd = torch.linalg.vecdot(self.theta[:, :D], dw)
        t, self.z, self.p, self.residual, self.weight = line_search(
            self.z, q, self.y, slope, curvature, wd, dd, self.l2
        )
        self.theta += t[:, None] * direction
        self.direction, self.grad_old, self.pre_old = direction, self.grad, pre
        total = self.residual.sum(1)
        xr = torch.bmm(self.residual[:, None, :], self.x)[:, 0]  # [G, D]
        self.grad = torch.empty_like(self.theta)
        self.grad[:, :D] = (xr - self.shift * total[:, None]) * self.inv / self.n + self.l2 * self.theta[:, :D]
        self.grad[:, D] = total / self.n


def solve_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    standardize: bool = False,
    tol: float = 1e-5,
    max_iter: int = 30,
    bound_iter: int = 15,
    mean: torch.Tensor | None = None,
    xty: torch.Tensor | None = None,
) -> Fit:
    """Fit ``G`` logistic regressions, one on each ``x [G, n, D]``, all with labels ``y [n]``.

    ``x`` is the workspace: it may be changed. With ``standardize`` the penalty is on the weights
    of the standardized features (population std, as ``StandardScaler``), fitted without a
    standardized copy; the returned weights and bias apply to ``x`` as given. A problem stops when
    its predicted step to the optimum (the preconditioned gradient, scaled up by how much the last
    line search stretched the step under the bound; the Newton step once Newton steps start) moves
    no weight (on the standardized features with ``standardize``) nor the bias by more than
    ``tol``: a rule on the parameters, so that a flat direction (a nearly separable probe's bias)
    is not left short as a rule on the loss decrease would. Up to ``bound_iter``
    conjugate-gradient steps under the curvature bound, then Newton steps, at most ``max_iter``
    steps in all. ``mean`` (``x.mean(1)``) and ``xty`` (``x^T y``), both ``[G, D]``,
    save a pass over ``x`` if the caller has them.
    """
    G, n, D = x.shape
    y = y.to(device=x.device, dtype=x.dtype)
    if mean is None or xty is None:
        sums = torch.bmm(torch.stack([torch.ones_like(y), y]).expand(G, 2, n), x)  # [G, 2, D]: one pass
        mean, xty = sums[:, 0] / n, sums[:, 1]
    state = _Probes(x, y, l2, standardize, mean, xty)
    inv = state.inv
    theta, loss = x.new_zeros(G, D + 1), x.new_zeros(G)
    n_iter = torch.full((G,), max_iter, dtype=torch.long, device=x.device)
    converged = torch.zeros(G, dtype=torch.bool, device=x.device)
    for iteration in range(max_iter + 1):
        if bound_iter <= iteration < max_iter:
            state.newton()
        pre = state.preconditioned()
        done = pre.abs().amax(1) * state.stretch <= tol  # the predicted step to the optimum is within tol
        converged[state.index[done]] = True
        if iteration == max_iter:
            done[:] = True
        if done.any():
            finished = state.index[done]
            theta[finished] = state.theta[done]
            loss[finished] = objective(state.z[done], y, state.theta[done, :D], l2)
            n_iter[finished] = n_iter[finished].clamp_max(iteration)
            if done.all():
                break
            if 2 * int(done.sum()) >= len(done):  # later steps touch only the unconverged problems
                keep = (~done).nonzero().flatten()
                state.keep(keep)
                pre = pre[keep]
        state.step(pre)
    weight = theta[:, :D] * inv
    return Fit(weight, theta[:, D] - torch.linalg.vecdot(weight, mean), n_iter, loss, converged)


def _line_search_one(z, q, y, slope: float, curvature: float, wd: float, dd: float, l2: float, steps: int = 10):
    """``line_search`` for one problem (``z``, ``q`` ``[n]``), its scalars kept in Python floats."""
    n = z.shape[0]
    t = -slope / curvature if curvature > 0 else 0.0
    low, high = 0.0, math.inf
    q2 = q * q
    for attempt in range(steps):
        z_new = torch.add(z, q, alpha=t)
        p = torch.sigmoid(z_new)
        residual = p - y
        weight = torch.addcmul(p, p, p, value=-1)  # p (1 - p)
        if attempt == steps - 1 or curvature <= 0:
            break
        slope = float(residual.dot(q)) / n + l2 * (wd + t * dd)
        curvature = float(weight.dot(q2)) / n + l2 * dd
        proposal = t - slope / max(curvature, 1e-30)
        if abs(proposal - t) <= 1e-3 * abs(t):
            break
        low, high = (t, high) if slope < 0 else (low, t)
        t = proposal if low < proposal < high else ((low + high) / 2 if high < math.inf else 2 * t)
    return t, z_new, p, residual, weight


def solve_lbfgs(
    x: torch.Tensor, y: torch.Tensor, *, l2: float, max_iter: int = 1000, tol: float = 1e-6, history: int = 10
) -> Fit:
    """Fit one logistic regression on ``x [n, d]`` by L-BFGS with the exact line search.

    Stops when the largest entry of the gradient (weights and bias of ``x`` as given) is at most
    ``tol``, the rule of ``torch.optim.LBFGS``'s ``tolerance_grad`` and scikit-learn's lbfgs, or when
    a step moves no parameter by more than 1e-9. Two matrix-vector products per iteration; the
    features are centered implicitly (the bias then decouples from the weights at the start).
    """
    n, d = x.shape
    y = y.to(device=x.device, dtype=x.dtype)
    mean = x.mean(0)
    ybar = min(max(float(y.mean()), 1e-6), 1 - 1e-6)
    theta = x.new_zeros(d + 1)  # weights, then the bias of the centered features
    theta[d] = math.log(ybar / (1 - ybar))
    z = x.new_full((n,), float(theta[d]))
    p = torch.full_like(z, ybar)
    residual, weight = p - y, p * (1 - p)

    def gradients() -> tuple[torch.Tensor, float]:
        """Gradient in (weights, centered bias) and the largest entry of the gradient in (weights, bias)."""
        grad = torch.empty_like(theta)
        raw = torch.mv(x.T, residual).div_(n).add_(theta[:d], alpha=l2)  # d/dw at a fixed bias
        mean_residual = float(residual.mean())
        torch.add(raw, mean, alpha=-mean_residual, out=grad[:d])
        grad[d] = mean_residual
        return grad, max(float(raw.abs().max()), abs(mean_residual))

    grad, largest = gradients()
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), newest last
    iteration, stalled = 0, False
    while iteration < max_iter and largest > tol:
        direction = -grad  # the two-loop recursion: direction = -H grad
        alphas = []
        for s, change, rho in reversed(pairs):
            alpha = rho * float(s.dot(direction))
            direction.add_(change, alpha=-alpha)
            alphas.append(alpha)
        if pairs:
            s, change, rho = pairs[-1]
            direction.mul_(1 / (rho * float(change.dot(change))))  # initial scaling s.y / y.y
        for (s, change, rho), alpha in zip(pairs, reversed(alphas)):
            direction.add_(s, alpha=alpha - rho * float(change.dot(direction)))
        slope = float(grad.dot(direction))
        if slope >= 0:  # not downhill: restart from the gradient
            pairs.clear()
            direction, slope = -grad, -float(grad.dot(grad))
        dw = direction[:d]
        q = torch.mv(x, dw).add_(float(direction[d] - mean.dot(dw)))
        dd = float(dw.dot(dw))
        curvature = float(weight.dot(q * q)) / n + l2 * dd
        t, z, p, residual, weight = _line_search_one(z, q, y, slope, curvature, float(theta[:d].dot(dw)), dd, l2)
        step = direction.mul_(t)
        theta += step
        new_grad, largest = gradients()
        change = new_grad - grad
        curve = float(change.dot(step))
        if curve > 1e-10 * float(change.dot(change)):  # keep the pair only where it adds positive curvature
            pairs = [*pairs[len(pairs) - history + 1 :], (step, change, 1 / curve)]
        grad = new_grad
        iteration += 1
        if float(step.abs().max()) <= 1e-9:
            stalled = True
            break
    w = theta[:d]
    converged = torch.tensor(stalled or largest <= tol)
    return Fit(w, theta[d] - mean.dot(w), torch.tensor(iteration), objective(z, y, w, l2), converged)
