"""``sahs loao``: leave-one-attack-out generalization of the configured detector, fold by fold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """Options of ``sahs loao``.

    Args:
        top_k: Heads per fold: a count, or a fraction in (0, 1) (default: ``data.top_k``, else 16).
        transfer: Also train on each family and test on each other (the transfer matrix).
        output: Folder for the results (default: ``<root_dir>/loao``).
    """

    top_k: float | None = None
    transfer: bool = False
    output: str | None = None


def _top_k(option: float | None, configured: int | None) -> int | float:
    if option is None:
        return configured if configured is not None else 16
    return int(option) if option >= 1 else float(option)


def main(argv: list[str]) -> None:
    from sahs.commands.run_config import parse
    from sahs.experiments import LoaoSettings
    from sahs.experiments.loao import leave_one_attack_out
    from sahs.data.rankings import RankingStore
    from sahs.experiments.transfer import transfer_matrix

    options, run = parse("loao", argv, keep_logger=True)
    run.ensure_cache()
    datamodule = run.datamodule
    layers = datamodule.candidate_layers()
    features = datamodule.read_layers(layers, dtype=None)  # stored dtype (float16): folds convert what they use
    rankings = RankingStore.for_cache(datamodule.cache)  # a ranking per fold, computed once and kept
    labels, attacks, groups = datamodule.labels, datamodule.column("attack"), datamodule.column("group")
    detector = run.module.detector
    if getattr(detector, "head_dim", 0) is None:  # group lasso needs each head's width
        detector.head_dim = datamodule.head_dim
    settings = LoaoSettings(top_k=_top_k(options.top_k, datamodule.hparams.top_k), detector=detector, seed=run.seed)
    result = leave_one_attack_out(features, labels, attacks, settings, layers=layers, groups=groups,
                                  progress=lambda line: print(f"[sahs] loao {line}", flush=True), rankings=rankings)
    output = Path(options.output or run.root_dir / "loao")
    result.save(output)
    summary = result.summary()
    if options.transfer:
        transfer = transfer_matrix(features, labels, attacks, settings, layers=layers, groups=groups,
                                   rankings=rankings)
        transfer.save(output)
        transfer.plot(output / "transfer.png")
        summary.update({f"transfer/{a}->{b}": float(transfer.auroc[i, j])
                        for i, a in enumerate(transfer.families) for j, b in enumerate(transfer.families)})
    for logger in run.loggers:
        logger.log_metrics(summary)
        logger.finalize("success")
    print("[sahs] leave-one-attack-out (held-out family: AUROC, ASR, PR)")
    for fold in result.folds:
        m = fold.metrics
        print(f"  {fold.attack:<12} auroc={m['auroc']:.4f}  asr={m['asr']:.4f}  pr={m['pr']:.4f}  "
              f"n_test={fold.n_test}  n_benign_share={fold.n_benign_share}  n_removed={fold.n_removed}")
    print(f"[sahs] loao/auroc_mean={result.auroc_mean:.4f}  loao/auroc_min={result.auroc_min:.4f}  ({output})")
