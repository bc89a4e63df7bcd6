"""Transfer matrix: train on one attack family, test on each family."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sahs.data.splits import split_rows
from sahs.eval.heatmap import plot_heatmap
from sahs.experiments.heads import fit_head_detector
from sahs.experiments.loao import _as_columns
from sahs.data.rankings import RankingStore
from sahs.experiments.settings import LoaoSettings


@dataclass
class TransferResult:
    """``auroc[i, j]``: detector trained on family ``families[i]``, tested on family ``families[j]``."""

    families: list[str]
    auroc: torch.Tensor  # [families, families]
    metrics: list[list[dict[str, float]]]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"families": self.families, "auroc": self.auroc.tolist(), "metrics": self.metrics}
        (directory / "transfer.json").write_text(json.dumps(payload, indent=1))
        return directory / "transfer.json"

    def plot(self, path: str | Path) -> Path:
        return plot_heatmap(
            self.auroc,
            path,
            title="Transfer AUROC",
            xlabel="tested on",
            ylabel="trained on",
            colorbar_label="AUROC",
            xticklabels=self.families,
            yticklabels=self.families,
            annotate=True,
        )


def transfer_matrix(
    features: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str] | np.ndarray,
    settings: LoaoSettings = LoaoSettings(),
    *,
    test_fraction: float = 0.3,
    layers: Sequence[int] | None = None,
    groups: Sequence | np.ndarray | None = None,
    rankings: RankingStore | None = None,
) -> TransferResult:
    """Train on one family, test on each family; the families with malicious prompts, ordered as ``np.unique``.

    The requests (groups) are split once into a training part and a test part, stratified by label
    and family: a request rendered by several families is on the same side in all of them. Cell
    ``(A, B)`` fits heads, scaler, detector and threshold on A's training part and scores B's test
    part, so each column is measured on the same prompts and no test request is ever trained on.
    A family with no benign prompts of its own (a jailbreak benchmark) is joined, on each side, by
    that side's part of the benign-only families (MM-Vet, XSTest-safe, ...), as in LOAO.
    ``rankings`` (a ``RankingStore``) looks up and keeps each family's head ranking.
    """
    features, labels, attacks, groups = _as_columns(features, labels, attacks, groups)
    y = labels.numpy()
    families = [str(family) for family in np.unique(attacks) if (y[attacks == family] == 1).any()]
    pooled = ~np.isin(attacks, families)  # rows of the benign-only families
    train, test = split_rows(labels, [test_fraction], settings.seed, attacks=attacks, groups=groups,
                             part="the transfer split")
    in_train = np.zeros(len(labels), dtype=bool)
    in_train[train.numpy()] = True

    def rows_of(family: str) -> np.ndarray:
        own = attacks == family
        return own | pooled if not (y[own] == 0).any() else own

    table = []
    for source in families:
        rows = torch.as_tensor(np.flatnonzero(rows_of(source) & in_train))
        fitted = fit_head_detector(
            features, labels, settings, rows=rows, layers=layers, attacks=attacks, groups=groups,
            name=f"family {source!r} training part", rank=None if rankings is None else rankings.rank)
        row = []
        for target in families:
            rows = torch.as_tensor(np.flatnonzero(rows_of(target) & ~in_train))
            row.append(fitted.evaluate(features, labels, part=f"family {target!r} test part", rows=rows))
        table.append(row)
    auroc = torch.tensor([[cell["auroc"] for cell in row] for row in table], dtype=torch.float64)
    return TransferResult(families, auroc, table)
