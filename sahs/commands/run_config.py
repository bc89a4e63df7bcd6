"""Build a run's objects (DataModule, detector, callbacks) from a fit config, without fitting."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule


@dataclass
class Run:
    """What a fit config describes, instantiated but not run."""

    datamodule: ActivationDataModule
    module: DetectorModule
    root_dir: Path
    extraction: object | None  # sahs.callbacks.ActivationExtraction, if the config has one
    seed: int
    loggers: list = field(default_factory=list)
    devices: dict = field(default_factory=dict)  # accelerator, devices, num_nodes, strategy as configured

    def ensure_cache(self) -> None:
        """Fill the cache through the config's extraction callback (no-op when it is reused), then load it."""
        if self.extraction is not None:
            self.extraction.fill(self.datamodule.cache_dir)
        self.datamodule.load()


def parse(verb: str, argv: list[str], add_arguments: Callable[[argparse.ArgumentParser], None],
          keep_logger: bool = False) -> tuple[argparse.Namespace, Run]:
    """Split the verb's own options from the fit config and its overrides, and build the run."""
    from sahs.callbacks import ActivationExtraction
    from sahs.cli import SahsCLI

    parser = argparse.ArgumentParser(prog=f"sahs {verb}", description=__doc__,
                                     epilog="Other options are fit-config overrides, e.g. --data.layers '[0, 1]'.")
    parser.add_argument("--config", required=True, help="the run config, as for `sahs fit`")
    add_arguments(parser)
    options, rest = parser.parse_known_args(argv)
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                  args=["--config", options.config, *([] if keep_logger else ["--trainer.logger=false"]), *rest])
    extraction = next((c for c in cli.trainer.callbacks if isinstance(c, ActivationExtraction)), None)
    seed = cli.config.get("seed_everything")
    run = Run(cli.datamodule, cli.model, Path(cli.trainer.default_root_dir), extraction,
              seed if isinstance(seed, int) else 0, list(cli.trainer.loggers),
              {key: cli.config[f"trainer.{key}"] for key in ("accelerator", "devices", "num_nodes", "strategy")})
    return options, run
