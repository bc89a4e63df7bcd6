"""The patching report: per-head effects with bootstrap intervals, the causal ranking, and its agreement with the probe.

Effects are in refusal-logit-difference units, positive when the head carries the refusal: for the
malicious prompt, how far the difference drops when the head's activation comes from the benign twin;
for the benign prompt, how far it rises with the malicious twin's. ``effect`` is their mean, the causal
ranking's key. Outputs: ``patching.json``, ``patching.csv``, ``patching_heatmap.png``,
``patching_vs_probe.png``, ``top_heads.yaml`` (``data.heads`` and ``ablate.heads``), and ``patch/...`` metrics.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sahs.eval.heatmap import heatmap_figure, save_figure
from sahs.eval.intervals import bootstrap_means, spearman

MEASURES = ("effect", "effect_malicious", "effect_benign", "direct")
CSV_COLUMNS = ("layer", "head", "causal_rank", *(f"{m}{s}" for m in MEASURES for s in ("", "_ci_low", "_ci_high")),
               "fraction", "probe_auroc", "probe_rank")


@dataclass
class PatchingResult:
    """Every pair's metric, clean and with each head patched, and the figures computed from them."""

    clean: torch.Tensor  # [2, pairs]: refusal logit difference of the malicious and of the benign prompt
    patched: torch.Tensor  # [2, pairs, layers, heads]: the same with one head patched from the twin
    direct: torch.Tensor | None  # [2, pairs, layers, heads]: path patching to the final position
    pair_ids: list[tuple[str, str]]
    groups: list[str]  # the malicious prompt's request group: the bootstrap's unit
    attacks: list[str]
    tokens: dict[str, Any]
    positions: str
    top_k: int
    n_boot: int
    seed: int
    probe_auroc: torch.Tensor | None = None  # [layers, heads], the probe ranking of the same cache
    generation: list[dict[str, Any]] | None = None

    @classmethod
    def from_measurements(cls, *, clean, patched, direct, pair_ids, groups, attacks, tokens, settings,
                          probe_auroc=None) -> PatchingResult:
        return cls(clean, patched, direct, list(pair_ids), list(groups), list(attacks), tokens, settings.positions,
                   settings.top_k, settings.n_boot, settings.seed, probe_auroc)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.patched.shape[2:])

    def effects(self, measure: str) -> torch.Tensor | None:
        """Per pair and head, ``[pairs, layers, heads]``; ``direct`` averages both directions like ``effect``."""
        clean = self.clean[:, :, None, None].double()
        source = self.direct if measure == "direct" else self.patched
        if source is None:
            return None
        malicious, benign = clean[0] - source[0].double(), source[1].double() - clean[1]
        return {"effect_malicious": malicious, "effect_benign": benign}.get(measure, (malicious + benign) / 2)

    def full_difference(self) -> torch.Tensor:
        """Per pair, the malicious prompt's refusal logit difference minus the benign twin's: ``[pairs]``."""
        return (self.clean[0] - self.clean[1]).double()

    def estimates(self, measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Mean over pairs and bootstrap interval, each ``[layers, heads]``."""
        values = self.effects(measure)
        if values is None:
            return None
        flat = values.reshape(len(self.pair_ids), -1).numpy()
        mean, low, high = bootstrap_means(flat, self.groups, self.n_boot, self.seed)
        return mean.reshape(self.shape), low.reshape(self.shape), high.reshape(self.shape)

    def ranking(self) -> list[tuple[int, int]]:
        """Every (layer, head), largest mean effect first (ties in layer, head order)."""
        mean = self.effects("effect").mean(dim=0)
        heads = [(layer, head) for layer in range(self.shape[0]) for head in range(self.shape[1])]
        return sorted(heads, key=lambda lh: (-float(mean[lh]), lh))

    def top(self, k: int) -> list[tuple[int, int]]:
        return self.ranking()[:k]

    def agreement(self) -> dict[str, Any] | None:
        """Spearman correlation of probe AUROC and effect over all heads, and the overlap of the two top k."""
        if self.probe_auroc is None:
            return None
        probe = self.probe_auroc.double().flatten().numpy()
        effect = self.effects("effect").mean(dim=0).flatten().numpy()
        ranked = np.isfinite(probe)  # heads of layers the probe ranking left out are NaN
        k = min(self.top_k, int(ranked.sum()))
        width = self.shape[1]
        order = np.argsort(np.where(ranked, -probe, np.inf), kind="stable")
        probe_top = {(int(i) // width, int(i) % width) for i in order[:k]}
        causal = [(layer, head) for layer, head in self.ranking() if ranked[layer * width + head]]
        common = probe_top & set(causal[:k])
        return {"spearman": spearman(probe[ranked], effect[ranked]), "k": k, "top_k_overlap": len(common),
                "top_k_overlap_fraction": len(common) / k, "common": sorted(common),
                "probe_top": sorted(probe_top)}

    def heads_table(self) -> list[dict[str, Any]]:
        """One row per head in causal order: every measure with its interval, fraction of the full difference, probe."""
        full = float(self.full_difference().mean())
        estimates = {m: self.estimates(m) for m in MEASURES}
        probe_rank = {}
        if self.probe_auroc is not None:
            flat = self.probe_auroc.double().flatten().numpy()
            order = [i for i in np.argsort(-flat, kind="stable") if np.isfinite(flat[i])]
            probe_rank = {(int(i) // self.shape[1], int(i) % self.shape[1]): r + 1 for r, i in enumerate(order)}
        rows = []
        for rank, (layer, head) in enumerate(self.ranking(), 1):
            row: dict[str, Any] = {"layer": layer, "head": head, "causal_rank": rank}
            for measure, found in estimates.items():
                for suffix, array in zip(("", "_ci_low", "_ci_high"), found or (None,) * 3):
                    row[measure + suffix] = None if array is None else float(array[layer, head])
            row["fraction"] = row["effect"] / full if full else None
            row["probe_auroc"] = None if self.probe_auroc is None else float(self.probe_auroc[layer, head])
            row["probe_rank"] = probe_rank.get((layer, head))
            rows.append(row)
        return rows

    def summary(self) -> dict[str, float]:
        """``patch/...`` metrics for the loggers."""
        full = self.full_difference().numpy()[:, None]
        mean, low, high = bootstrap_means(full, self.groups, self.n_boot, self.seed)
        best = self.heads_table()[0]
        metrics = {"patch/full_logit_diff": mean[0], "patch/full_logit_diff_ci_low": low[0],
                   "patch/full_logit_diff_ci_high": high[0], "patch/best_effect": best["effect"],
                   "patch/best_fraction": best["fraction"], "patch/pairs": len(self.pair_ids)}
        if best["direct"] is not None:
            metrics["patch/best_direct"] = max(r["direct"] for r in self.heads_table())
        agreement = self.agreement()
        if agreement is not None:
            metrics["patch/spearman_probe"] = agreement["spearman"]
            metrics["patch/top_k_overlap"] = agreement["top_k_overlap_fraction"]
        for row in self.generation or []:
            metrics[f"patch/refusal_rate/{row['patched']}"] = row["malicious_refusal_rate"]
            metrics[f"patch/benign_refusal_rate/{row['patched']}"] = row["benign_refusal_rate"]
        return {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}

    def as_dict(self) -> dict[str, Any]:
        full = self.full_difference().numpy()[:, None]
        mean, low, high = bootstrap_means(full, self.groups, self.n_boot, self.seed)
        return {"positions": self.positions, "pairs": len(self.pair_ids), "tokens": self.tokens,
                "full_logit_diff": {"value": float(mean[0]), "ci_low": float(low[0]), "ci_high": float(high[0])},
                "clean_malicious_mean": float(self.clean[0].mean()), "clean_benign_mean": float(self.clean[1].mean()),
                "top_heads": [list(h) for h in self.top(self.top_k)], "agreement": self.agreement(),
                "heads": self.heads_table(), "pair_ids": [list(p) for p in self.pair_ids],
                "generation": [{k: v for k, v in row.items() if k != "answers"} for row in self.generation or []]}

    def plot_heatmap(self, path: str | Path) -> Path:
        mean = self.effects("effect").mean(dim=0)
        figure = heatmap_figure(mean, title=f"Patching effect per head ({self.positions} positions)",
                                xlabel="head", ylabel="layer", colorbar_label="effect on refusal logit difference",
                                marks=self.top(self.top_k))
        return save_figure(figure, path)

    def plot_scatter(self, path: str | Path) -> Path:
        """Probe AUROC against patching effect, one point per head, the causal top k labelled."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5.2, 4.0), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        mean = self.effects("effect").mean(dim=0)
        axes.scatter(self.probe_auroc.flatten().numpy(), mean.flatten().numpy(), s=14, alpha=0.7)
        for layer, head in self.top(self.top_k):
            axes.annotate(f"L{layer}.H{head}", (float(self.probe_auroc[layer, head]), float(mean[layer, head])),
                          fontsize=8, xytext=(3, 3), textcoords="offset points", color="red")
        agreement = self.agreement()
        axes.set(xlabel="probe AUROC (held-out)", ylabel="patching effect (refusal logit difference)",
                 title=f"Probe vs patching, Spearman {agreement['spearman']:.2f}")
        return save_figure(figure, path)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write JSON, CSV, the heatmap, the scatter plot (with a probe ranking), the answers and ``top_heads.yaml``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "patching.json", "csv": folder / "patching.csv",
                 "heatmap": folder / "patching_heatmap.png", "heads": folder / "top_heads.yaml"}
        paths["json"].write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(self.heads_table())
        self.plot_heatmap(paths["heatmap"])
        if self.probe_auroc is not None:
            paths["scatter"] = self.plot_scatter(folder / "patching_vs_probe.png")
        heads = [list(h) for h in self.top(self.top_k)]
        paths["heads"].write_text(f"# the top {len(heads)} heads by patching effect: "
                                  "sahs fit|ablate --config C --config top_heads.yaml\n"
                                  + yaml.safe_dump({"data": {"heads": heads}, "ablate": {"heads": [list(h) for h in heads]}},
                                                   default_flow_style=None), encoding="utf-8")
        if self.generation:
            paths["answers"] = folder / "patching_answers.jsonl"
            with paths["answers"].open("w", encoding="utf-8") as handle:
                for row in self.generation:
                    for i, answer in enumerate(row["answers"]):
                        pair = self.pair_ids[i // 2]
                        handle.write(json.dumps({"patched": row["patched"], "id": pair[i % 2], "label": 1 - i % 2,
                                                 "answer": answer}, ensure_ascii=False) + "\n")
        return paths

    def log(self, loggers: list[Any], paths: dict[str, Path]) -> None:
        """Metrics to every logger; the per-head table and the plots to loggers that take them (W&B)."""
        summary = self.summary()
        table = self.heads_table()
        for logger in loggers:
            logger.log_metrics(summary)
            if hasattr(logger, "log_table"):
                logger.log_table(key="patch/heads", columns=list(CSV_COLUMNS),
                                 data=[[row[c] for c in CSV_COLUMNS] for row in table])
            if hasattr(logger, "log_image"):
                logger.log_image(key="patch/heatmap", images=[str(paths["heatmap"])])
                if "scatter" in paths:
                    logger.log_image(key="patch/vs_probe", images=[str(paths["scatter"])])
