"""``sahs locate``: rank every head by how well a probe on it alone separates the classes."""

from __future__ import annotations

import argparse
from pathlib import Path

from sahs.commands.run_config import parse


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top_k", type=int, default=10, help="how many of the best heads to print")
    parser.add_argument("--output", default=None, help="folder for the ranking (default: <root_dir>/locate)")


def main(argv: list[str]) -> None:
    options, run = parse("locate", argv, _arguments)
    run.datamodule.hparams.top_k = options.top_k
    run.ensure_cache()  # ranks on the training split while loading
    ranking = run.datamodule.ranking
    output = Path(options.output or run.root_dir / "locate")
    ranking.save(output)
    heatmap = ranking.plot(output / "head_ranking.png")
    print(f"[sahs] top {options.top_k} heads by held-out probe AUROC (layer, head):")
    for layer, head in run.datamodule.selected_heads:
        position = run.datamodule.cache.layers.index(layer)
        print(f"  L{layer:02d}.H{head:02d}  auroc={float(ranking.auroc[position, head]):.4f}  "
              f"acc={float(ranking.accuracy[position, head]):.4f}")
    print(f"[sahs] ranking written to {output} (heatmap {heatmap.name})")
