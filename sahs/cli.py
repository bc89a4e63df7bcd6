"""LightningCLI for ``sahs fit|validate|test|predict`` (the entry point, ``sahs.__main__``, dispatches every verb)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from sahs.__main__ import main, usage  # noqa: F401  (the entry point, kept importable from here)
from sahs.commands import LIGHTNING_VERBS
from sahs.commands import checks, runs
from sahs.data.datamodule import ActivationDataModule
from sahs.errors import UserError
from sahs.models.artifact import DetectorArtifact
from sahs.models.module import DetectorModule


# Interpolations such as ${trainer.default_root_dir} are resolved after the command line is applied.
PARSER_MODE = "omegaconf+"


class SaveRunConfig(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's folder and gives the full config to W&B loggers."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        runs.log_config(trainer.loggers, yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


class SahsCLI(LightningCLI):
    """After ``fit``, the best checkpoint is validated and tested, and the figures printed with its epoch;
    ``validate`` and ``test`` need ``--ckpt_path`` and print the same summary.

    Every verb's own options (``sahs.commands.<verb>.Options``) are a section of the run config, so
    one YAML can carry ``loao: {top_k: 8}`` and still run ``sahs fit``; so is ``run:`` (name, group,
    tags). A Lightning verb run, or a ``verb`` given here, gets its own folder ``<root>/<verb>/<name>``
    (``run_dir``) holding its config, checkpoints, logs and results. ``predict`` writes one row per
    prompt through ``sahs.callbacks.PredictionWriter`` (options under ``predictions:``). With
    ``--ckpt_path`` the DataModule reads the checkpoint's heads from the start.
    """

    def __init__(self, *args, verb: str | None = None, **kwargs) -> None:
        self.verb = verb
        self.run_dir: Path | None = None
        self.argv: list[str] = []
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from sahs.callbacks import PredictionWriter
        from sahs.commands.run_config import verb_options

        parser.add_argument(
            "--benchmarks_root", type=Optional[str], default=None,
            help="Folder holding the downloaded benchmarks; a config refers to it as ${benchmarks_root} "
                 "(resolved after the command line, so --benchmarks_root DIR works too)")
        parser.add_class_arguments(runs.RunIdentity, "run", help="name, W&B group and tags of the run")
        for verb, options in verb_options().items():
            parser.add_class_arguments(options, verb, help=f"options of `sahs {verb}`")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _adopt_checkpoint_heads(self) -> None:
        # Before the Trainer runs, so that the configured selection (e.g. a top_k ranking) is never computed.
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path not in (None, "best", "last", "hpc", "registry"):
            self.datamodule.adopt(DetectorArtifact.read_checkpoint(ckpt_path).features)
        if self.subcommand in ("validate", "test"):
            self.config_init[self.subcommand]["verbose"] = False  # the summary below replaces Lightning's table

    before_validate = before_test = before_predict = _adopt_checkpoint_heads

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(sys.argv[1:] if args is None else args)
        checks.check_not_a_sweep(self.argv, self.verb or (self.argv[0] if self.argv else "fit"))
        if self.argv and self.argv[0] in getattr(self, "_subcommand_parsers", {}):
            # A parser of the verb alone reads the run config at its root, so that ${trainer.default_root_dir}
            # in a config file names the run config's keys and resolves after the command line (omegaconf+);
            # under the verb table it would be ${fit.trainer.default_root_dir}.
            verb = self.argv[0]
            alone = self._prepare_subcommand_parser(self.trainer_class, verb, parser_mode=PARSER_MODE,
                                                    prog=f"sahs {verb}", description=LIGHTNING_VERBS.get(verb))
            self.config = Namespace({"subcommand": verb, verb: alone.parse_args(self.argv[1:])})
        else:
            super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs):
        verb = self.subcommand or self.verb
        if self.subcommand in ("validate", "test") and self.config_init[verb].get("ckpt_path") is None:
            # Before the run folder exists: without a checkpoint it would score an untrained detector.
            raise UserError(f"sahs {verb} scores a trained detector: give --ckpt_path "
                            "(e.g. <run folder>/checkpoints/best-<epoch>.ckpt from `sahs fit`)")
        self._check_settings(verb)
        if verb is not None:
            self._place_run(verb)
        return super().instantiate_trainer(**kwargs)

    def _check_settings(self, verb: str | None) -> None:
        """Before the run's folder exists and before any work: settings that cannot work are one line."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        checks.check_run(config, init, verb, ("loao.top_k", config.get("loao.top_k")) if verb == "loao" else None)

    def _place_run(self, verb: str) -> None:
        """Make the run's folder and point the trainer, its loggers and checkpoints into it."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.run_dir = runs.place_run(config, self._get(self.config_init, "trainer"), verb, self.argv,
                                      inherit=self.subcommand is not None)

    def init_parser(self, **kwargs):
        # A config error raises, so that ``main`` prints the key at fault in one line, not 80 lines of usage.
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run or self.trainer.interrupted:
            return self._close()
        self._save_ranking()
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        metrics = {}
        for run in (self.trainer.validate, self.trainer.test):
            for result in run(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False):
                metrics.update(result)
        best_epoch = self.model.checkpoint_epoch if ckpt_path else None
        if best_epoch is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({"best_epoch": best_epoch}, step=self.trainer.global_step)
        if self.trainer.is_global_zero:
            print_summary(metrics, {"best_epoch": best_epoch})
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            runs.log_files(self.trainer.loggers, run_dir,
                           [run_dir / runs.CONFIG_FILE, *sorted(run_dir.glob("head_ranking.*"))], "fit")
        self._close()

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            print_summary(self.trainer.callback_metrics, {"epoch": self.model.checkpoint_epoch})
        self._close()

    after_test = after_validate

    def after_predict(self) -> None:
        self._close()

    def _close(self) -> None:
        """Finish the loggers (a W&B run ends here, so a next run in this process starts its own)."""
        runs.finish(self.trainer.loggers, ok=not self.trainer.interrupted)
        if self.trainer.is_global_zero and self.run_dir is not None:
            print(f"[sahs] run folder: {self.run_dir}")

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


def print_summary(metrics: Mapping[str, float], context: dict[str, int | None]) -> None:
    """The overall figures on one line (then ``context``, e.g. the best epoch), then the per-family tables."""
    overall = sorted(name for name in metrics if name.count("/") == 1 and not name.endswith("loss"))
    cells = [f"{name}={value}" for name, value in context.items() if value is not None]
    print("[sahs] " + "  ".join([f"{name}={float(metrics[name]):.4f}" for name in overall] + cells))
    print_by_family(metrics)


def print_by_family(metrics: Mapping[str, float]) -> None:
    """The ``<stage>/<metric>/<family>`` figures as one table per stage (blank where a family lacks a class)."""
    for stage in ("val", "test"):
        rows: dict[str, dict[str, float]] = {}
        for name, value in metrics.items():
            parts = name.split("/", 2)
            if len(parts) == 3 and parts[0] == stage and parts[1] in ("auroc", "asr", "pr"):
                rows.setdefault(parts[2], {})[parts[1]] = float(value)
        if not rows:
            continue
        width = max(map(len, rows)) + 2
        print(f"[sahs] {stage} by attack family (ASR and PR at the validation threshold):")
        for family in sorted(rows):
            cells = "  ".join(f"{m}={rows[family][m]:.4f}" if m in rows[family] else f"{m}={'-':>6}"
                              for m in ("auroc", "asr", "pr"))
            print(f"  {family:<{width}}{cells}")


def lightning_main(args: list[str] | None = None) -> SahsCLI:
    """fit/validate/test/predict; an error after the run's folder exists carries it as ``error.run_dir``."""
    inherited = runs.RUN_DIR_ENV in os.environ
    try:
        return SahsCLI(
            DetectorModule,
            ActivationDataModule,
            parser_kwargs={"parser_mode": PARSER_MODE},
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except BaseException as error:
        if not inherited and runs.RUN_DIR_ENV in os.environ:  # a process that a multi-device run launched keeps it
            error.run_dir = os.environ[runs.RUN_DIR_ENV]
        raise
    finally:
        if not inherited:  # the next run in this process gets a folder of its own
            os.environ.pop(runs.RUN_DIR_ENV, None)


if __name__ == "__main__":
    main()
