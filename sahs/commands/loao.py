"""``sahs loao``: leave-one-attack-out generalization of the configured detector, fold by fold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """Options of ``sahs loao``.

    Args:
        top_k: Heads per fold: a count, or a fraction in (0, 1) (default: ``data.top_k``, else 16).
        transfer: Also train on each family and test on each other (the transfer matrix).
        max_iter: Most iterations of each fold's full-batch detector fit.
        n_boot: Bootstrap replicates of every AUROC's interval (whole requests resampled within each fold).
        level: Confidence level of the intervals.
        repeats: Runs of the whole protocol with seeds seed, seed + 1, ...: figures are their means, and
            loao/auroc_mean_std their spread.
    """

    top_k: int | float | None = None  # an int stays an int in the config and on W&B (8, not 8.0)
    transfer: bool = False
    max_iter: int = 1000
    n_boot: int = 1000
    level: float = 0.95
    repeats: int = 1

    def __post_init__(self) -> None:
        # A whole number is a count however it was written (a sweep's 8 can reach the parser as 8.0):
        # only a fraction in (0, 1) selects a share of the heads.
        if isinstance(self.top_k, float) and self.top_k >= 1 and self.top_k.is_integer():
            self.top_k = int(self.top_k)


@dataclass
class LoaoRun:
    """A finished ``sahs loao`` run: its folder, its resolved config and the metrics it logged."""

    dir: Path
    config: dict
    metrics: dict[str, float]


def _top_k(option: float | None, configured: int | None) -> int | float:
    if option is None:
        return configured if configured is not None else 16
    return int(option) if option >= 1 else float(option)


def main(argv: list[str]) -> None:
    run(argv)


def run(argv: list[str], store=None, parser=None, quiet: bool = False, fixed: int = 0) -> LoaoRun:
    """One leave-one-attack-out run in its own folder.

    Runs of a sweep share an ``InputStore`` (one read of the cache) and a ``RunParser`` (one parser, which
    reads the first ``fixed`` arguments, the same in every run, once).
    An error after the run's folder exists carries it as ``error.run_dir``.
    """
    from sahs.commands import runs
    from sahs.commands.run_config import RunParser
    from sahs.experiments.inputs import InputStore

    parser = parser if parser is not None else RunParser("loao")
    options, config = parser.parse(argv, keep_logger=True, new_run=True, fixed=fixed)
    try:
        result = _leave_one_attack_out(options, config, store if store is not None else InputStore(every_layer=False),
                                       quiet)
    except BaseException as error:
        error.run_dir = config.dir
        runs.finish(config.loggers, ok=False)
        raise
    runs.finish(config.loggers, ok=True)
    return result


def load_inputs(run, store):
    """What LOAO reads from the run's cache, filling the cache first (once per cache and extraction setting)."""
    if (run.datamodule, run.extraction_config) not in store and run.extraction is not None:
        run.extraction.fill(run.datamodule.cache_dir)
    return store.get(run.datamodule, run.extraction_config)


def _leave_one_attack_out(options: Options, run, store, quiet: bool) -> LoaoRun:
    from sahs.commands import runs
    from sahs.experiments import LoaoSettings
    from sahs.experiments.records import METRICS_FILE
    from sahs.experiments.loao import SCORES_FILE, leave_one_attack_out
    from sahs.experiments.transfer import transfer_matrix

    runs.log_config(run.loggers, run.config)
    datamodule = run.datamodule
    detector = run.module.detector
    settings = LoaoSettings(top_k=_top_k(options.top_k, datamodule.hparams.top_k), detector=detector,
                            seed=run.seed, max_iter=options.max_iter, n_boot=options.n_boot, level=options.level,
                            repeats=options.repeats)  # checked before the cache is read
    inputs = load_inputs(run, store)
    if getattr(detector, "head_dim", 0) is None:  # group lasso needs each head's width
        detector.head_dim = inputs.head_dim
    settings.resolve_top_k(inputs.features.shape[1] * inputs.features.shape[2])  # before the first fold
    columns = (inputs.features, inputs.labels, inputs.attacks)
    result = leave_one_attack_out(*columns, settings, layers=inputs.layers, groups=inputs.groups, ids=inputs.ids,
                                  progress=lambda line: print(f"[sahs] {run.dir.name} {line}", flush=True),
                                  rankings=inputs.rankings)
    result.save(run.dir)
    summary = result.summary()
    files = [run.dir / name for name in (runs.CONFIG_FILE, "loao.json", "loao.csv", SCORES_FILE, METRICS_FILE)]
    if options.transfer:
        transfer = transfer_matrix(*columns, settings.with_(repeats=1), layers=inputs.layers, groups=inputs.groups,
                                   rankings=inputs.rankings)
        files += [transfer.save(run.dir), transfer.plot(run.dir / "transfer.png")]
        summary.update({f"transfer/{a}->{b}": float(transfer.auroc[i, j])
                        for i, a in enumerate(transfer.families) for j, b in enumerate(transfer.families)})
    (run.dir / METRICS_FILE).write_text(json.dumps(summary, indent=1))
    for logger in run.loggers:
        logger.log_metrics(summary)
    runs.log_files(run.loggers, run.dir, files, "loao")
    if not quiet:
        print(table(result, run.dir))
    return LoaoRun(run.dir, run.config, summary)


def table(result, run_dir: Path) -> str:
    """The console table: each held-out family's AUROC with its interval, ASR, PR and fit, then the mean."""
    level = result.auroc_interval.level
    repeats = f", mean of {len(result.repeats)} repeats" if result.repeats else ""
    lines = [f"[sahs] leave-one-attack-out (held-out family: AUROC [{level:.0%} interval], ASR, PR{repeats})"]
    for fold in result.folds:
        m = fold.metrics
        fit = "" if fold.converged is None else f"  iter={fold.n_iter}" + ("" if fold.converged else " (max_iter)")
        lines.append(f"  {fold.attack:<12} auroc={fold.auroc_ci.text()}  asr={m['asr']:.4f}  pr={m['pr']:.4f}  "
                     f"n_test={fold.n_test}  n_benign_share={fold.n_benign_share}  n_removed={fold.n_removed}{fit}")
    spread = "" if result.auroc_mean_std is None else f" (std over repeats {result.auroc_mean_std:.4f})"
    lines.append(f"[sahs] loao/auroc_mean={result.auroc_interval.text()}{spread}  loao/auroc_min={result.auroc_min:.4f}"
                 f"  ({run_dir})")
    if result.folds_not_converged:
        lines.append(f"[sahs] {result.folds_not_converged} fold fit(s) stopped at max_iter: raise --loao.max_iter "
                     "or the detector's regularization")
    return "\n".join(lines)
