"""``sahs ablate``: refusals with the top-k located heads ablated, against no ablation and random heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sahs.experiments.ablate import AblationSettings


@dataclass
class Options(AblationSettings):
    """Options of ``sahs ablate`` (the ``ablate:`` section of a run config).

    Args:
        k: Heads ablated in the top-k setting and in each random setting.
        seeds: Seeds of the random-head control, one setting each; they must differ.
        mode: ``zero`` writes zeros into the heads' slices, ``mean`` their mean over benign training prompts.
        max_new_tokens: Tokens generated per answer (greedy decoding).
        batch_size: Prompts per generation batch.
        reference_size: Benign training prompts whose per-head means ``mean`` ablation writes.
        judge: Refusal judge (``class_path`` / ``init_args``); None: the refusal-phrase matcher ``PhraseJudge()``.
        heads: ``[[layer, head], ...]`` ablated in the top setting instead of the probe ranking's top k (e.g. the
            top heads of ``sahs patch``, its ``top_heads.yaml``); each random setting then draws as many.
        output: Folder for the results (default: the run's own folder, ``<root_dir>/ablate/<run name>``).
    """

    output: str | None = None


def main(argv: list[str]) -> None:
    from sahs.commands import runs
    from sahs.commands.run_config import parse
    from sahs.experiments.ablate import ablation_plan, run_ablation, split_prompts
    from sahs.extract.models import load_model, release

    options, run = parse("ablate", argv, keep_logger=True, new_run=True)
    runs.log_config(run.loggers, run.config)
    if run.extraction is None:
        raise SystemExit("this config has no sahs.callbacks.ActivationExtraction in trainer.callbacks: "
                         "it names no model or prompt set to ablate")
    run.ensure_cache()
    ranking = probe_ranking(run.datamodule)
    candidates = [(layer, head) for layer in ranking.layers for head in range(ranking.auroc.shape[1])]
    top = [tuple(pair) for pair in options.heads] if options.heads else ranking.top(min(options.k, len(candidates)))
    plan = ablation_plan(top, candidates, options)
    datamodule = run.datamodule
    ids = datamodule.column("id")
    test, reference = split_prompts(run.extraction.prompts.load(), ids[datamodule.splits["test"].numpy()],
                                    ids[datamodule.splits["train"].numpy()], options.reference_size)
    model, processor = load_model(run.extraction.model)
    try:
        result = run_ablation(model, processor, test, plan, options, reference=reference,
                              progress=lambda line: print(f"[sahs] ablate {line}", flush=True))
    finally:
        del model
        release()
    output = Path(options.output) if options.output else run.dir
    paths = result.save(output)
    ranking.save(output)  # the ranking whose top-k was ablated
    result.log(run.loggers, paths["plot"])
    runs.finish(run.loggers)
    print(result.markdown())
    summary = result.summary()
    shown = ("asr_none", "asr_top", "asr_random_mean", "benign_refusal_top", "benign_agreement_top")
    print("[sahs] " + "  ".join(f"ablate/{m}={summary[f'ablate/{m}']:.4f}" for m in shown if f"ablate/{m}" in summary)
          + f"  ({output})")


def probe_ranking(datamodule):
    """The run's head ranking (``data.top_k``), or the one ``sahs locate`` computes and stores beside the cache."""
    if datamodule.ranking is not None:
        return datamodule.ranking
    from sahs.data.rankings import RankingStore

    layers = datamodule.candidate_layers()
    features = datamodule.read_layers(layers, dtype=None)  # the stored dtype; probes convert chunk by chunk
    return RankingStore.for_cache(datamodule.cache).rank(
        features, datamodule.labels, rows=datamodule.splits["train"], layers=layers, seed=datamodule.hparams.seed,
        attacks=datamodule.column("attack"), groups=datamodule.column("group"))
