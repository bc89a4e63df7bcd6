"""Build a run's objects (DataModule, detector, callbacks) from a fit config, without fitting.

A verb's own options are the ``<verb>:`` section of the same config, parsed by the same
jsonargparse parser as everything else, so they can live in the YAML or on the command line.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def verb_options() -> dict[str, type]:
    """Every verb's ``Options`` dataclass, by verb: the config sections verbs read."""
    from sahs.commands import VERBS

    found = {}
    for verb in VERBS:
        options = getattr(importlib.import_module(f"sahs.commands.{verb}"), "Options", None)
        if options is not None:
            found[verb] = options
    return found


def _shorthand(verb: str, options: type | None, argv: list[str]) -> list[str]:
    """Accept ``--top_k 8`` for ``--<verb>.top_k 8``, and a bare boolean flag ``--transfer`` for ``=true``."""
    if options is None:
        return argv
    fields = {f.name: f for f in dataclasses.fields(options)}
    out = []
    for index, arg in enumerate(argv):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in fields:
            out.append(arg)
            continue
        following = argv[index + 1] if index + 1 < len(argv) else None
        bare = not eq and fields[name].type in (bool, "bool") and (following is None or following.startswith("--"))
        out.append(f"--{verb}.{name}={'true' if bare else value}" if bare or eq else f"--{verb}.{name}")
    return out


def parse(verb: str, argv: list[str], keep_logger: bool = False) -> tuple[Any, Run]:
    """Parse ``sahs <verb>``'s command line (a run config, overrides, the verb's section) and build the run."""
    from sahs.callbacks import ActivationExtraction
    from sahs.cli import SahsCLI

    options_class = verb_options().get(verb)
    args = _shorthand(verb, options_class, argv)
    if not keep_logger and not any(a.startswith("--trainer.logger") for a in args):
        args = [*args, "--trainer.logger=false"]
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": "omegaconf", "prog": f"sahs {verb}"},
                  run=False, args=args)
    extraction = next((c for c in cli.trainer.callbacks if isinstance(c, ActivationExtraction)), None)
    seed = cli.config.get("seed_everything")
    run = Run(cli.datamodule, cli.model, Path(cli.trainer.default_root_dir), extraction,
              seed if isinstance(seed, int) else 0, list(cli.trainer.loggers),
              {key: cli.config[f"trainer.{key}"] for key in ("accelerator", "devices", "num_nodes", "strategy")})
    options = None
    if options_class is not None:
        options = cli.config_init[verb]
        if not isinstance(options, options_class):  # a section jsonargparse left as a Namespace
            options = options_class(**cli.config[verb].as_dict())
    return options, run
