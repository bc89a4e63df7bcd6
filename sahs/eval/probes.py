"""Locating safety heads: one logistic probe per attention head, fitted in a single batched solve.

Every (layer, head) gets a logistic regression on its own ``head_dim`` activation, fitted on a
stratified part of the given rows and scored by AUROC on the rest. All probes of a chunk of heads
are solved together (``sahs.eval.logistic.solve_probes``): one batched Gram product gives each probe
a ``[D+1, D+1]`` curvature bound (``head_dim`` is small) that preconditions conjugate-gradient steps,
and the few probes that need them take Newton steps. No Python loop runs over heads; the AUROC is
rank-based and batched too.
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
from matplotlib.figure import Figure

from sahs.data.splits import split_rows
from sahs.eval.heatmap import heatmap_figure, save_figure
from sahs.eval.logistic import solve_probes
from sahs.eval.metrics import batched_auroc

RANKING_JSON = "head_ranking.json"
RANKING_CSV = "head_ranking.csv"


def fit_head_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float = 1e-2,
    max_iter: int = 30,
    tol: float = 1e-5,
    bound_iter: int = 15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``G`` independent logistic regressions at once; returns ``(weight [G, D], bias [G])``.

    ``x`` is ``[G, n, D]`` (one design per probe; float16 is fitted in float32), ``y`` ``[n]``.
    Each probe minimizes mean BCE + ``l2/2 * ||w||^2`` (bias unpenalized), the objective of
    ``LogisticDetector``, with ``sahs.eval.logistic.solve_probes``: conjugate-gradient steps
    preconditioned by the curvature bound, then up to ``max_iter`` steps in all (Newton steps after
    ``bound_iter``); a probe stops when its predicted step to the optimum moves no weight nor the
    bias by more than ``tol``.
    """
    x = torch.as_tensor(x)
    workspace = x.clone() if x.dtype in (torch.float32, torch.float64) else x.float()  # solve_probes may change it
    fit = solve_probes(workspace, y, l2=l2, tol=tol, max_iter=max_iter, bound_iter=bound_iter)
    return fit.weight, fit.bias


# Workspace of one chunk of heads: its rows in the stored dtype plus a float32 copy, heads first.
_CHUNK_BYTES = 48 * 2**20


def _holdout_logits(
    flat: torch.Tensor,
    fit_rows: torch.Tensor,
    holdout_rows: torch.Tensor,
    y_fit: torch.Tensor,
    *,
    l2: float,
    max_iter: int,
    tol: float,
    standardize: bool,
    heads_per_chunk: int,
    device: torch.device,
) -> torch.Tensor:
    """Fit a probe per head of ``flat [n, heads, head_dim]`` on ``fit_rows``; its logits on ``holdout_rows``.

    Heads go through two reused buffers a chunk at a time (gather the rows, then one copy to float32
    on ``device``, heads first), so the features are never copied or converted
    whole. Returns ``[heads, n_holdout]`` on the CPU.
    """
    _, heads, head_dim = flat.shape
    rows = torch.cat([fit_rows, holdout_rows]).to(flat.device)
    m, n_fit = len(rows), len(fit_rows)
    per_head = m * head_dim * (flat.element_size() + 4)
    chunk = max(1, min(heads_per_chunk, heads, _CHUNK_BYTES // per_head))
    stored = torch.empty(chunk * m * head_dim, dtype=flat.dtype, device=flat.device)
    work = torch.empty(chunk * m * head_dim, dtype=torch.float32, device=device)
    y = y_fit.to(device=device, dtype=torch.float32)
    ones_and_y = torch.stack([torch.ones_like(y), y])  # [2, n_fit]
    logits = torch.empty(heads, len(holdout_rows))
    for start in range(0, heads, chunk):
        size = min(chunk, heads - start)
        gathered = stored[: size * m * head_dim].view(m, size, head_dim)
        torch.index_select(flat[:, start : start + size], 0, rows, out=gathered)
        x = work[: size * m * head_dim].view(size, m, head_dim)
        x.copy_(gathered.permute(1, 0, 2))  # [heads, rows, head_dim] in float32
        sums = torch.bmm(ones_and_y.expand(size, 2, n_fit), x[:, :n_fit])  # [size, 2, head_dim]: rows of x in order
        if not torch.isfinite(sums).all():  # NaN/inf reach the sums
            raise ValueError(f"features of heads {start}..{start + size - 1} (flat index) are not finite")
        probe = dict(l2=l2, standardize=standardize, tol=tol, max_iter=max_iter)
        fit = solve_probes(x[:, :n_fit], y, mean=sums[:, 0] / n_fit, xty=sums[:, 1], **probe)
        holdout = torch.bmm(fit.weight[:, None, :], x[:, n_fit:].transpose(1, 2))[:, 0] + fit.bias[:, None]
        logits[start : start + size] = holdout.cpu()
    return logits


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

    def to_json(self) -> str:
        """The JSON that ``save`` writes and ``load`` reads (full matrices and meta; no pickle)."""
        payload = {
            "layers": self.layers,
            "heads": self.shape[1],
            "auroc": self.auroc.tolist(),
            "accuracy": self.accuracy.tolist(),
            "meta": self.meta,
        }
        return json.dumps(payload, indent=1)

    def save(self, directory: str | Path) -> Path:
        """Write ``head_ranking.json`` (full matrices) and ``head_ranking.csv`` (one row per head, best first)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RANKING_JSON).write_text(self.to_json())
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
    rows: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    groups: Sequence | np.ndarray | None = None,
    attacks: Sequence[str] | np.ndarray | None = None,
    holdout_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 30,
    tol: float = 1e-5,
    standardize: bool = True,
    heads_per_chunk: int = 64,
    device: str | torch.device | None = None,
) -> HeadRanking:
    """Score every head by a logistic probe on its activation; uses only the rows given.

    Args:
        features: Activations ``[n, layers, heads, head_dim]`` (float16 or float32).
        labels: ``[n]``, 0 benign and 1 malicious.
        rows: Rank on these rows only (indices into ``features``, ``labels``, ``groups`` and
            ``attacks``); the features are read in place, never copied whole. All rows when None.
        layers: Model layer number of each entry of the layer axis (``0..layers-1`` when None).
        groups: Request id of each row: a request never sits on both sides of the probes' hold-out.
        attacks: Attack family of each row, to stratify the hold-out by (label, attack).
        holdout_fraction: Share of each stratum held out to score the probes.
        seed: Seed of the split.
        l2: Probe penalty ``l2/2 * ||w||^2`` on the mean BCE (as ``LogisticDetector``).
        max_iter: Most iterations of a probe (conjugate-gradient steps, then Newton steps after 15).
        tol: A probe stops when its predicted step to the optimum moves no standardized weight nor the bias by more.
        standardize: Scale each head dimension by mean/std of the probe-fitting rows.
        heads_per_chunk: Most heads solved together (fewer when their rows would pass 48 MiB of workspace).
        device: Where the probes are fitted (e.g. ``"cuda"``); default the features' device. Chunks of
            heads are copied there one at a time, so the features themselves may stay in CPU memory.
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
    rows = torch.arange(n) if rows is None else torch.as_tensor(rows).cpu().long()
    pick = (lambda values: None if values is None else np.asarray(values)[rows.numpy()])
    fit_part, holdout_part = split_rows(labels[rows], [holdout_fraction], seed, attacks=pick(attacks),
                                        groups=pick(groups), part="head ranking rows", both_classes=True)
    fit_rows, holdout_rows = rows[fit_part], rows[holdout_part]
    flat = features.reshape(n, layers * heads, head_dim)
    y_fit, y_holdout = labels[fit_rows].float(), labels[holdout_rows]
    device = features.device if device is None else torch.device(device)
    settings = dict(l2=l2, max_iter=max_iter, tol=tol, standardize=standardize, heads_per_chunk=heads_per_chunk)
    logits = _holdout_logits(flat, fit_rows, holdout_rows, y_fit, device=device, **settings)  # [heads, n_holdout]
    auroc = batched_auroc(logits, y_holdout, part="probe held-out rows")
    accuracy = ((logits >= 0) == y_holdout.bool()).double().mean(dim=1)
    meta = dict(n_fit=len(fit_rows), n_holdout=len(holdout_rows), holdout_fraction=holdout_fraction, seed=seed, l2=l2)
    meta.update(standardize=standardize, head_dim=head_dim)
    layer_numbers = list(range(layers)) if layers_given is None else [int(layer) for layer in layers_given]
    return HeadRanking(auroc.view(layers, heads), accuracy.view(layers, heads), layer_numbers, meta)
