"""``sahs loao``: leave-one-attack-out generalization of the configured detector, fold by fold."""

from __future__ import annotations

import argparse
from pathlib import Path

from sahs.commands.run_config import parse
from sahs.eval.loao import leave_one_attack_out, transfer_matrix


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top_k", type=float, default=None,
                        help="heads per fold: a count, or a fraction in (0, 1) (default: data.top_k, else 16)")
    parser.add_argument("--transfer", action="store_true", help="also train on each family and test on each other")
    parser.add_argument("--output", default=None, help="folder for the results (default: <root_dir>/loao)")


def _top_k(option: float | None, configured: int | None) -> int | float:
    if option is None:
        return configured if configured is not None else 16
    return int(option) if option >= 1 else option


def main(argv: list[str]) -> None:
    options, run = parse("loao", argv, _arguments, keep_logger=True)
    run.ensure_cache()
    datamodule = run.datamodule
    cache = datamodule.cache
    layers = datamodule.hparams.layers or cache.layers
    candidates = [(layer, head) for layer in layers for head in range(cache.layout["num_heads"])]
    features = cache.read(candidates).view(len(cache), len(layers), cache.layout["num_heads"], -1)
    labels, attacks = cache.labels, cache.column("attack")
    detector = run.module.detector
    if getattr(detector, "head_dim", 0) is None:  # group lasso needs each head's width
        detector.head_dim = cache.layout["head_dim"]
    settings = dict(top_k=_top_k(options.top_k, datamodule.hparams.top_k), detector=detector,
                    seed=run.seed)
    result = leave_one_attack_out(features, labels, attacks, **settings)
    for fold in result.folds:  # report model layer indices, not positions in the candidate list
        fold.heads = [(layers[position], head) for position, head in fold.heads]
    output = Path(options.output or run.root_dir / "loao")
    result.save(output)
    summary = result.summary()
    if options.transfer:
        transfer = transfer_matrix(features, labels, attacks, **settings)
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
              f"n_test={fold.n_test}")
    print(f"[sahs] loao/auroc_mean={result.auroc_mean:.4f}  loao/auroc_min={result.auroc_min:.4f}  ({output})")
