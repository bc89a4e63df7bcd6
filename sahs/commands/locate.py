"""``sahs locate``: rank every head by how well a probe on it alone separates the classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """Options of ``sahs locate``.

    Args:
        top_k: How many of the best heads to print and box in the heatmap.
        output: Folder for the ranking (default: ``<root_dir>/locate``).
    """

    top_k: int = 10
    output: str | None = None


def main(argv: list[str]) -> None:
    from sahs.commands.run_config import parse
    from sahs.data.rankings import RankingStore

    options, run = parse("locate", argv)
    run.ensure_cache()
    datamodule = run.datamodule
    ranking = datamodule.ranking
    if ranking is None:  # explicit heads, or every head of some layers: rank the candidates here
        layers = datamodule.candidate_layers()
        train = datamodule.splits["train"]
        features = datamodule.read_layers(layers, dtype=None)  # the stored dtype; probes convert chunk by chunk
        print(f"[sahs] ranking {features.shape[1] * features.shape[2]} heads on {len(train)} training prompts")
        ranking = RankingStore.for_cache(datamodule.cache).rank(
            features, datamodule.labels, rows=train, layers=layers, seed=datamodule.hparams.seed,
            attacks=datamodule.column("attack"), groups=datamodule.column("group"))
    output = Path(options.output or run.root_dir / "locate")
    ranking.save(output)
    top = ranking.top(min(options.top_k, ranking.auroc.numel()))
    heatmap = ranking.plot(output / "head_ranking.png", selected=top)
    print(f"[sahs] top {len(top)} heads by held-out probe AUROC (layer, head):")
    for layer, head in top:
        auroc, accuracy = ranking.score(layer, head)
        print(f"  L{layer:02d}.H{head:02d}  auroc={auroc:.4f}  acc@0.5={accuracy:.4f}")
    print(f"[sahs] ranking written to {output} (heatmap {heatmap.name})")
