"""Locating safety heads: one logistic probe per attention head, fitted in a single batched solve.

Every (layer, head) gets a logistic regression on its own ``head_dim`` activation, fitted on a
stratified part of the given rows and scored by AUROC on the rest. All probes of a chunk of heads
are solved together with batched ``[D+1, D+1]`` linear systems (``head_dim`` is small): steps with a
fixed curvature bound, then Newton steps for the few probes that need them. No Python loop runs
over heads; the AUROC is rank-based and batched too.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from sahs.data.splits import split_rows
from sahs.eval.heatmap import heatmap_figure, save_figure
from sahs.eval.metrics import batched_auroc

RANKING_JSON = "head_ranking.json"
RANKING_CSV = "head_ranking.csv"


def _probe_loss(logits: torch.Tensor, theta: torch.Tensor, y: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").mean(dim=1)
    return bce + 0.5 * (ridge * theta.pow(2)).sum(dim=1)  # [G]


# A tiny ridge on the linear systems keeps the Cholesky factorizations safe; the gradient is exact,
# so it changes the steps, not the optimum.
_DAMPING = 1e-6


def _gradient(design: torch.Tensor, theta: torch.Tensor, y: torch.Tensor, ridge: torch.Tensor):
    logits = (design @ theta.unsqueeze(-1)).squeeze(-1)  # [A, n]
    prob = torch.sigmoid(logits)
    grad = ((prob - y).unsqueeze(1) @ design).squeeze(1) / design.shape[1] + ridge * theta  # [A, D + 1]
    return logits, prob, grad


def _bound_steps(design, y, ridge, theta, steps: int, tol: float) -> torch.Tensor:
    """Steps with the fixed curvature bound ``X^T X / 4n`` (Bohning); updates ``theta``, returns unconverged probes."""
    G, n, _ = design.shape
    bound = design.transpose(1, 2) @ design / (4 * n) + torch.diag(ridge + _DAMPING)
    factor, _ = torch.linalg.cholesky_ex(bound)  # [G, D + 1, D + 1], one factor per probe for all steps
    active = torch.arange(G, device=design.device)
    for _ in range(steps):
        everyone = len(active) == G  # skip the gathers while no probe has converged
        current = theta if everyone else theta[active]
        _, _, grad = _gradient(design if everyone else design[active], current, y, ridge)
        direction = torch.cholesky_solve(-grad.unsqueeze(-1), factor if everyone else factor[active]).squeeze(-1)
        theta[active] = current + direction  # the bound majorizes the loss: a full step always lowers it
        active = active[-(grad * direction).sum(dim=1) / 2 > tol]
        if len(active) == 0:
            break
    return active


def _newton_steps(design, y, ridge, theta, active: torch.Tensor, steps: int, tol: float) -> None:
    """Newton steps with a per-probe Armijo line search for the probes in ``active``; updates ``theta``."""
    n = design.shape[1]
    for _ in range(steps):
        sub, current = design[active], theta[active]  # [A, n, D + 1], [A, D + 1]
        logits, prob, grad = _gradient(sub, current, y, ridge)
        hessian = (sub * (prob * (1 - prob)).unsqueeze(-1)).transpose(1, 2) @ sub / n
        factor, _ = torch.linalg.cholesky_ex(hessian + torch.diag(ridge + _DAMPING))
        direction = torch.cholesky_solve(-grad.unsqueeze(-1), factor).squeeze(-1)
        slope = (grad * direction).sum(dim=1)  # [A]: minus the squared Newton decrement
        going = -slope / 2 > tol
        if not going.any():
            return
        active, sub, current, logits = active[going], sub[going], current[going], logits[going]
        direction, slope = direction[going], slope[going]
        # Along the direction the logits move linearly, so each trial step costs no matrix product.
        logits_step = (sub @ direction.unsqueeze(-1)).squeeze(-1)  # [A, n]
        loss = _probe_loss(logits, current, y, ridge)
        step = torch.ones_like(slope)
        for _ in range(30):
            trial = _probe_loss(logits + step[:, None] * logits_step, current + step[:, None] * direction, y, ridge)
            accepted = trial <= loss + 1e-4 * step * slope
            if accepted.all():
                break
            step = torch.where(accepted, step, step / 2)
        theta[active] = current + step[:, None] * direction


def fit_head_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float = 1e-2,
    max_iter: int = 30,
    tol: float = 1e-8,
    bound_iter: int = 15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``G`` independent logistic regressions at once; returns ``(weight [G, D], bias [G])``.

    ``x`` is ``[G, n, D]`` (one design per probe), ``y`` ``[n]``. Each probe minimizes mean BCE +
    ``l2/2 * ||w||^2`` (bias unpenalized), the objective of ``LogisticDetector``.

    First up to ``bound_iter`` steps with the fixed curvature bound ``X^T X / 4n`` (one Cholesky
    factor per probe, no line search), enough for heads whose probabilities stay away from 0 and 1,
    i.e. most of them; probes still moving then take up to ``max_iter`` Newton steps. A probe stops
    when its predicted loss decrease (half the squared Newton decrement) falls below ``tol``.
    """
    G, n, D = x.shape
    y = y.to(device=x.device, dtype=x.dtype)
    design = torch.cat([x, x.new_ones(G, n, 1)], dim=2)  # [G, n, D + 1]; the last column is the bias
    ridge = x.new_full((D + 1,), l2)
    ridge[-1] = 0.0
    theta = x.new_zeros(G, D + 1)
    active = _bound_steps(design, y, ridge, theta, bound_iter, tol)
    if len(active):
        _newton_steps(design, y, ridge, theta, active, max_iter, tol)
    return theta[:, :D], theta[:, D]


@dataclass
class HeadRanking:
    """Per-head probe scores on held-out rows, indexed by model layer; ``top(k)`` lists the best heads.

    Row ``i`` of ``auroc`` and ``accuracy`` belongs to model layer ``layers[i]``: a ranking over a
    subset of layers (``data.layers: [12, 13]``) still names the model's own layer numbers.
    """

    auroc: torch.Tensor  # [len(layers), heads]
    accuracy: torch.Tensor  # [len(layers), heads]
    layers: list[int] = field(default_factory=list)  # model layer of each row; 0..L-1 when not given
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers] or list(range(self.auroc.shape[0]))
        if len(self.layers) != self.auroc.shape[0]:
            raise ValueError(f"{len(self.layers)} layer numbers for a ranking of {self.auroc.shape[0]} layers")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.auroc.shape)

    def order(self) -> torch.Tensor:
        """Flat head indices best first: by AUROC, then accuracy, then lower index."""
        flat = torch.arange(self.auroc.numel())
        by_accuracy = flat[self.accuracy.flatten().argsort(descending=True, stable=True)]
        return by_accuracy[self.auroc.flatten()[by_accuracy].argsort(descending=True, stable=True)]

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` best heads as model ``(layer, head)`` pairs, best first."""
        if not 1 <= k <= self.auroc.numel():
            raise ValueError(f"k must be in [1, {self.auroc.numel()}], got {k}")
        heads = self.shape[1]
        return [(self.layers[int(i) // heads], int(i) % heads) for i in self.order()[:k]]

    def score(self, layer: int, head: int) -> tuple[float, float]:
        """``(auroc, accuracy)`` of model layer ``layer``'s head ``head``."""
        row = self._row(layer)
        return float(self.auroc[row, head]), float(self.accuracy[row, head])

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not ranked; the ranking covers layers {self.layers}")
        return self.layers.index(layer)

    def save(self, directory: str | Path) -> Path:
        """Write ``head_ranking.json`` (full matrices) and ``head_ranking.csv`` (one row per head, best first)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "layers": self.layers,
            "heads": self.shape[1],
            "auroc": self.auroc.tolist(),
            "accuracy": self.accuracy.tolist(),
            "meta": self.meta,
        }
        (directory / RANKING_JSON).write_text(json.dumps(payload, indent=1))
        with open(directory / RANKING_CSV, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rank", "layer", "head", "auroc", "accuracy"])
            for rank, (layer, head) in enumerate(self.top(self.auroc.numel()), start=1):
                auroc, acc = self.score(layer, head)
                writer.writerow([rank, layer, head, repr(auroc), repr(acc)])
        return directory / RANKING_JSON

    @classmethod
    def load(cls, path: str | Path) -> HeadRanking:
        """Read a ranking written by ``save``: its directory or its JSON file."""
        path = Path(path)
        payload = json.loads((path / RANKING_JSON if path.is_dir() else path).read_text())
        to_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
        auroc = to_tensor(payload["auroc"])
        layers = payload["layers"] if isinstance(payload["layers"], list) else list(range(auroc.shape[0]))
        return cls(auroc, to_tensor(payload["accuracy"]), layers, payload.get("meta", {}))

    def figure(self, selected: Sequence[tuple[int, int]] = ()) -> Figure:
        """Heatmap of probe AUROC, model layers x heads, with the ``selected`` model ``(layer, head)`` pairs boxed.

        The colour scale spans the AUROCs found, so a map near chance (heads below 0.5 included) still
        shows its spread; the colour bar gives the numbers.
        """
        return heatmap_figure(
            self.auroc,
            title="Per-head probe AUROC (held-out rows)",
            xlabel="head",
            ylabel="layer",
            colorbar_label="AUROC",
            marks=[(self._row(layer), head) for layer, head in selected],
            yticklabels=[str(layer) for layer in self.layers],
        )

    def plot(self, path: str | Path, selected: Sequence[tuple[int, int]] = ()) -> Path:
        """Write ``figure(selected)`` as a PNG."""
        return save_figure(self.figure(selected), path)


def rank_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    groups: Sequence | np.ndarray | None = None,
    attacks: Sequence[str] | np.ndarray | None = None,
    holdout_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 30,
    tol: float = 1e-8,
    standardize: bool = True,
    heads_per_chunk: int = 64,
) -> HeadRanking:
    """Score every head by a logistic probe on its activation; uses only the rows given.

    Args:
        features: Activations ``[n, layers, heads, head_dim]`` (float16 or float32).
        labels: ``[n]``, 0 benign and 1 malicious.
        layers: Model layer number of each entry of the layer axis (``0..layers-1`` when None).
        groups: Request id of each row: a request never sits on both sides of the probes' hold-out.
        attacks: Attack family of each row, to stratify the hold-out by (label, attack).
        holdout_fraction: Share of each stratum held out to score the probes.
        seed: Seed of the split.
        l2: Probe penalty ``l2/2 * ||w||^2`` on the mean BCE (as ``LogisticDetector``).
        max_iter: Most Newton iterations, for the probes the bound steps leave unconverged.
        tol: Stop when every probe's predicted loss decrease (half the squared Newton decrement) is below this.
        standardize: Scale each head dimension by mean/std of the probe-fitting rows.
        heads_per_chunk: Heads solved together; memory is about ``16 * n * heads_per_chunk * head_dim`` bytes.
    """
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels).cpu()
    if features.ndim != 4 or labels.shape != features.shape[:1]:
        shapes = f"{tuple(features.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"need features [n, layers, heads, head_dim] and labels [n], got {shapes}")
    layers_given = layers
    n, layers, heads, head_dim = features.shape
    if layers_given is not None and len(layers_given) != layers:
        raise ValueError(f"{len(layers_given)} layer numbers given for features with {layers} layers")
    fit_rows, holdout_rows = split_rows(labels, [holdout_fraction], seed, attacks=attacks, groups=groups,
                                        part="head ranking rows", both_classes=True)
    flat = features.reshape(n, layers * heads, head_dim)
    y_fit, y_holdout = labels[fit_rows].float(), labels[holdout_rows]
    auroc = torch.empty(layers * heads, dtype=torch.float64)
    accuracy = torch.empty(layers * heads, dtype=torch.float64)
    for start in range(0, layers * heads, heads_per_chunk):
        chunk = slice(start, min(start + heads_per_chunk, layers * heads))
        x_fit = flat[fit_rows, chunk].float().transpose(0, 1).contiguous()  # [G, n_fit, head_dim]
        x_holdout = flat[holdout_rows, chunk].float().transpose(0, 1)  # [G, n_holdout, head_dim]
        if not (torch.isfinite(x_fit.sum()) and torch.isfinite(x_holdout.sum())):  # NaN/inf reach the sums
            raise ValueError(f"features of heads {chunk.start}..{chunk.stop - 1} (flat index) are not finite")
        if standardize:
            mean = x_fit.mean(dim=1, keepdim=True)
            x_fit = x_fit - mean
            std = x_fit.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)  # population std, as StandardScaler
            x_fit, x_holdout = x_fit / std, (x_holdout - mean) / std
        weight, bias = fit_head_probes(x_fit, y_fit, l2=l2, max_iter=max_iter, tol=tol)
        logits = (torch.einsum("gnd,gd->gn", x_holdout, weight) + bias[:, None]).cpu()  # [G, n_holdout]
        auroc[chunk] = batched_auroc(logits, y_holdout, part="probe held-out rows")
        accuracy[chunk] = ((logits >= 0) == y_holdout.bool()).double().mean(dim=1)
    meta = dict(n_fit=len(fit_rows), n_holdout=len(holdout_rows), holdout_fraction=holdout_fraction, seed=seed, l2=l2)
    meta.update(standardize=standardize, head_dim=head_dim)
    layer_numbers = list(range(layers)) if layers_given is None else [int(layer) for layer in layers_given]
    return HeadRanking(auroc.view(layers, heads), accuracy.view(layers, heads), layer_numbers, meta)
