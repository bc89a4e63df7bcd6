"""``sahs patch``: a causal head ranking by activation patching, side by side with the probe ranking."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sahs.experiments.patching import PatchSettings


@dataclass
class Options(PatchSettings):
    """Options of ``sahs patch`` (the ``patch:`` section of a run config).

    Args:
        refusal_tokens: Answers whose first token counts as refusing (each string's first token as the model
            would write it after its chat template's assistant turn; duplicates count once).
        compliance_tokens: Answers whose first token counts as complying.
        positions: ``all``: every position both prompts of a pair have (aligned from the end); ``last``: the last one.
        pairing: ``family``: malicious and benign prompts of the same attack family in id order (the built-in
            sets' twins); ``group``: within a request group holding both labels; ``file``: ``pairs_file``.
        pairs_file: CSV or JSONL with the columns ``malicious_id, benign_id`` (ids of the prompt set), for ``file``.
        split: The rows pairs come from: the run's ``test`` split (default), ``val``, ``train`` or ``all`` (a
            ``pairs_file``'s pairs are taken as listed).
        max_pairs: Pairs used at most (a seeded draw when there are more).
        batch_size: Pairs per forward (each forward runs twice as many prompts).
        top_k: Heads labelled in the plots, compared with the probe's top k, written to ``top_heads.yaml`` and
            judged after generation.
        max_new_tokens: Tokens generated per answer for the judged refusal rates; 0 skips generation.
        judge: Refusal judge (``class_path`` / ``init_args``); None: the refusal-phrase matcher ``PhraseJudge()``.
        n_boot: Bootstrap replicates of the intervals (pairs resampled by the malicious prompt's request group).
        seed: Seed of the pair draw and of the bootstrap.
        progress: Show a progress bar over the heads.
        output: Folder for the results (default: the run's own folder, ``<root_dir>/patch/<run name>``).
    """

    output: str | None = None


def main(argv: list[str]) -> None:
    from sahs.commands import runs
    from sahs.commands.run_config import parse

    options, run = parse("patch", argv, keep_logger=True, new_run=True)
    try:
        _patch(options, run)
    except BaseException:
        runs.finish(run.loggers, ok=False)
        raise
    runs.finish(run.loggers, ok=True)


def _patch(options: Options, run) -> None:
    import torch

    from sahs.commands import runs
    from sahs.commands.ablate import probe_ranking
    from sahs.experiments.patching import PatchingError, make_pairs, run_patching
    from sahs.extract.adapters import find_adapter
    from sahs.extract.models import load_model, release

    runs.log_config(run.loggers, run.config)
    if run.extraction is None:
        raise PatchingError("this config has no sahs.callbacks.ActivationExtraction in trainer.callbacks: "
                            "it names no model or prompt set to patch")
    run.ensure_cache()
    datamodule = run.datamodule
    ranking = probe_ranking(datamodule)  # the probe ranking of the same cache
    prompts = run.extraction.prompts.load()
    position = {pid: i for i, pid in enumerate(prompts["id"])}
    ids = datamodule.column("id")
    chosen = ids if options.split == "all" else ids[datamodule.splits[options.split].numpy()]
    missing = [pid for pid in chosen if pid not in position]
    if missing:
        raise PatchingError(f"{len(missing)} cached prompts (e.g. {missing[0]!r}) are not in the configured prompt "
                            "set; the cache was made from another set: rebuild it (`sahs extract`)")
    pairs = make_pairs(prompts, [position[pid] for pid in chosen], options)
    model, processor = load_model(run.extraction.model)
    try:
        layout = find_adapter(model).layout
        probe = torch.full((layout.num_layers, layout.num_heads), float("nan"))
        probe[ranking.layers] = ranking.auroc.float()
        print(f"[sahs] patch: {layout.num_layers * layout.num_heads} heads over {len(pairs)} pairs "
              f"({options.pairing} pairing, {options.positions} positions)", flush=True)
        result = run_patching(model, processor, prompts, pairs, options, probe_auroc=probe,
                              progress=lambda line: print(f"[sahs] patch {line}", flush=True))
    finally:
        del model
        release()
    output = Path(options.output) if options.output else run.dir
    paths = result.save(output)
    ranking.save(output)  # the probe ranking compared against
    result.log(run.loggers, paths)
    runs.log_files(run.loggers, output, [output / runs.CONFIG_FILE, *paths.values()], "patch")
    _print(result, output)


def _print(result, output: Path) -> None:
    table = result.heads_table()
    full = result.as_dict()["full_logit_diff"]
    print(f"[sahs] full refusal logit difference (malicious - benign): {full['value']:.4f} "
          f"[{full['ci_low']:.4f}, {full['ci_high']:.4f}] over {len(result.pair_ids)} pairs")
    print(f"[sahs] top {result.top_k} heads by patching effect (layer, head):")
    for row in table[:result.top_k]:
        direct = "" if row["direct"] is None else f"  direct={row['direct']:.4f}"
        probe = "" if row["probe_auroc"] is None else f"  probe_auroc={row['probe_auroc']:.4f} (rank {row['probe_rank']})"
        print(f"  L{row['layer']:02d}.H{row['head']:02d}  effect={row['effect']:.4f} "
              f"[{row['effect_ci_low']:.4f}, {row['effect_ci_high']:.4f}]  fraction={row['fraction']:.3f}{direct}{probe}")
    agreement = result.agreement()
    if agreement is not None:
        print(f"[sahs] agreement with the probe ranking: Spearman {agreement['spearman']:.4f}, "
              f"top-{agreement['k']} overlap {agreement['top_k_overlap']}/{agreement['k']}")
    for row in result.generation or []:
        print(f"[sahs] patched {row['patched']}: malicious refused {row['malicious_refusal_rate']:.3f}, "
              f"benign refused {row['benign_refusal_rate']:.3f}")
    heads = [[row["layer"], row["head"]] for row in table[:result.top_k]]
    print(f"[sahs] results in {output}; use the top heads with --ablate.heads '{heads}' or --data.heads '{heads}' "
          f"(or --config {output / 'top_heads.yaml'})")
