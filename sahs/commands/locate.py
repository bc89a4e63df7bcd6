"""``sahs locate``: rank every head by how well a probe on it alone separates the classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """Options of ``sahs locate``.

    Args:
        top_k: How many of the best heads to print and box in the heatmap.
    """

    top_k: int = 10


def main(argv: list[str]) -> None:
    from sahs.commands import runs
    from sahs.commands.run_config import parse

    options, run = parse("locate", argv, keep_logger=True, new_run=True)
    try:
        _locate(options, run)
    except BaseException as error:
        error.run_dir = run.dir
        runs.finish(run.loggers, ok=False)
        raise
    runs.finish(run.loggers, ok=True)


def _locate(options: Options, run) -> None:
    import time

    from sahs.commands import runs
    from sahs.data.rankings import RankingStore

    runs.log_config(run.loggers, run.config)
    run.ensure_cache()
    datamodule = run.datamodule
    ranking = datamodule.ranking
    if ranking is None:  # explicit heads, or every head of some layers: rank the candidates here
        layers = datamodule.candidate_layers()
        train = datamodule.splits["train"]
        features = datamodule.read_layers(layers, dtype=None)  # the stored dtype; probes convert chunk by chunk
        print(f"[sahs] locate: ranking {features.shape[1] * features.shape[2]} heads of layers {layers} "
              f"on {len(train)} training prompts", flush=True)
        start = time.perf_counter()
        ranking = RankingStore.for_cache(datamodule.cache).rank(
            features, datamodule.labels, rows=train, layers=layers, seed=datamodule.hparams.seed,
            attacks=datamodule.column("attack"), groups=datamodule.column("group"))
        print(f"[sahs] locate: ranked in {time.perf_counter() - start:.1f} s", flush=True)
    output = run.dir
    ranking.save(output)
    top = ranking.top(min(options.top_k, ranking.auroc.numel()))
    heatmap = ranking.plot(output / "head_ranking.png", selected=top)
    print(f"[sahs] top {len(top)} heads by held-out probe AUROC (layer, head):")
    for layer, head in top:
        auroc, accuracy = ranking.score(layer, head)
        print(f"  L{layer:02d}.H{head:02d}  auroc={auroc:.4f}  acc@0.5={accuracy:.4f}")
    for logger in run.loggers:
        logger.log_metrics({"locate/best_auroc": ranking.score(*top[0])[0]})
        if hasattr(logger, "log_image"):
            logger.log_image(key="heads/ranking", images=[str(heatmap)])
    runs.log_files(run.loggers, output, [output / runs.CONFIG_FILE, *sorted(output.glob("head_ranking.*"))], "locate")
    print(f"[sahs] ranking written to {output} (heatmap {heatmap.name})")
