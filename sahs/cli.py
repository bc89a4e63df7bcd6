"""The ``sahs`` command: LightningCLI for fit/validate/test/predict, plus the project's own verbs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

from sahs.commands import VERBS
from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule


class SahsCLI(LightningCLI):
    """After ``fit``, the best checkpoint is validated and tested, and the AUROC figures printed.

    Every verb's own options (``sahs.commands.<verb>.Options``) are a section of the run config, so
    one YAML can carry ``loao: {top_k: 8}`` and still run ``sahs fit``.
    """

    def add_arguments_to_parser(self, parser) -> None:
        from sahs.commands.run_config import verb_options

        for verb, options in verb_options().items():
            parser.add_class_arguments(options, verb, help=f"options of `sahs {verb}`")

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        self._save_ranking()
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        metrics = {}
        for run in (self.trainer.validate, self.trainer.test):
            for result in run(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False):
                metrics.update(result)
        if self.trainer.is_global_zero:
            shown = "  ".join(f"{name}={metrics[name]:.4f}" for name in sorted(metrics) if not name.endswith("loss"))
            print(f"[sahs] {shown}")


    def _save_ranking(self) -> None:
        """With ``top_k``, keep the head ranking with the run (JSON, CSV, heatmap; a W&B image if logging there)."""
        ranking = getattr(self.datamodule, "ranking", None)
        if ranking is None or not self.trainer.is_global_zero:
            return
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        ranking.save(run_dir)
        heatmap = ranking.plot(run_dir / "head_ranking.png", selected=self.datamodule.selected_heads)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="heads/ranking", images=[str(heatmap)])


def lightning_main(args: list[str] | None = None) -> SahsCLI:
    return SahsCLI(
        DetectorModule,
        ActivationDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _verb(module: str) -> Callable[[list[str]], None]:
    """A verb whose code is imported only when it runs."""
    return lambda args: importlib.import_module(f"sahs.commands.{module}").main(args)


LIGHTNING_VERBS = {
    "fit": "extract (or reuse) the cache, train the detector, then validate and test the best checkpoint",
    "validate": "validate a trained detector (--ckpt_path) on the validation split",
    "test": "test a trained detector (--ckpt_path) on the test split",
    "predict": "score prompts with a trained detector (--ckpt_path)",
}

# Verbs that are not Trainer methods: each takes the rest of the command line.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], object]] = {
    verb: _verb(verb) for verb in VERBS
}


def usage() -> str:
    """``sahs --help``: every verb with its one-line description."""
    width = max(map(len, [*LIGHTNING_VERBS, *VERBS])) + 2
    lines = ["usage: sahs VERB [--config CONFIG] [overrides ...]", "",
             "Find the safety attention heads of a vision-language model and train detectors on them.", "",
             "verbs:"]
    lines += [f"  {verb:<{width}}{text}" for verb, text in {**LIGHTNING_VERBS, **VERBS}.items()]
    lines += ["", "`sahs VERB --help` documents a verb's options; every verb reads the same run config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
    elif argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
    else:
        lightning_main(argv)


if __name__ == "__main__":
    main()
