"""Build a run's objects (DataModule, detector, callbacks) from a fit config, without fitting.

A verb's own options are the ``<verb>:`` section of the same config, parsed by the same
jsonargparse parser as everything else, so they can live in the YAML or on the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_dumper

from sahs.commands import checks, runs
from sahs.experiments.records import CONFIG_FILE
from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule


# The dump format of a run's saved config: JSON where it reads back exactly what YAML would, else an error.
PLAIN_JSON = "sahs_plain_json"


def _json_native(value: Any) -> bool:
    """Whether JSON reads ``value`` back as YAML does: string-keyed dicts, lists, strings, numbers, booleans, None."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_native(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_json_native(item) for item in value)
    return value is None or isinstance(value, (str, int, float))


def _plain_json(data: Any) -> str:
    if not _json_native(data):
        raise TypeError("not plain JSON")
    return json.dumps(data)


set_dumper(PLAIN_JSON, _plain_json)


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
    dir: Path | None = None  # the run's own folder, ``<root_dir>/<verb>/<name>`` (verbs that make one)
    config: dict = field(default_factory=dict)  # the full resolved config, plain values
    extraction_config: str = ""  # the extraction callback's config: runs that share it share a cache
    argv: list[str] = field(default_factory=list)  # the command line as parsed (verb shorthands expanded)
    parser: Any = field(default=None, repr=False)  # the run config's parser, for checking more overrides

    def save_config(self) -> Path:
        """Write the full resolved config into the run's folder; ``sahs <verb> --config`` on it re-runs the run."""
        path = self.dir / CONFIG_FILE
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return path

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


class RunParser:
    """Parses one verb's run configs; after the first, with the parser built then (a sweep parses hundreds).

    The first parse builds everything through ``SahsCLI``; later ones only parse, instantiate the config's
    classes and place the run (no Trainer is built: the verbs that reuse a parser do not train).
    """

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.options_class = verb_options().get(verb)
        self._parser = None
        self._fixed: FixedArgs | None = None  # a sweep's leading arguments, read once

    def parse(self, argv: list[str], keep_logger: bool = False, new_run: bool = False,
              fixed: int = 0) -> tuple[Any, Run]:
        """Parse ``sahs <verb>``'s command line (a run config, overrides, the verb's section) and build the run.

        With ``new_run`` the run gets its own folder ``<root_dir>/<verb>/<run.name>`` (``Run.dir``), its
        loggers write there and carry the run's identity, and its full config is saved there. The first
        ``fixed`` arguments are the same in every call (a sweep's run config and its fixed overrides): they
        are read once, and each call applies only the rest to a copy. A config error raises
        ``ArgumentError`` (``sahs`` prints the key at fault in one line).
        """
        args = _shorthand(self.verb, self.options_class, argv)
        if not keep_logger and not any(a.startswith("--trainer.logger") for a in args):
            args = [*args, "--trainer.logger=false"]
        if self._parser is None:
            config, init, run_dir = self._first(args, new_run)
        else:
            config = self._parse_args(args, fixed)
            init = self._parser.instantiate_classes(config)
            checks.check_run(config, init, self.verb,
                             ("loao.top_k", config.get("loao.top_k")) if self.verb == "loao" else None)
            run_dir = runs.place_run(config, init["trainer"], self.verb, args) if new_run else None
        options, run = self._options(config, init), self._run(config, init, run_dir, args)
        section = run.config.get(self.verb) if options is not None else None
        for key, value in (section or {}).items():  # a whole number the options took as a count (8.0 -> 8)
            if type(value) is float and type(getattr(options, key, None)) is int:
                section[key] = getattr(options, key)  # is what the loggers record
        return options, run

    def _parse_args(self, args: list[str], fixed: int) -> Any:
        """``parser.parse_args(args)``, reading ``args[:fixed]`` once per parser (the same result, in less time)."""
        parser = self._parser
        if not 0 < fixed < len(args) or not args[fixed].startswith("--") or not _can_read_once(parser):
            return parser.parse_args(args)
        head = tuple(args[:fixed])
        if self._fixed is None or self._fixed.head != head:
            self._fixed = FixedArgs(parser, head)
        return self._fixed.parse(args)

    def _first(self, args: list[str], new_run: bool):
        from sahs.cli import PARSER_MODE, SahsCLI

        parser_kwargs = {"parser_mode": PARSER_MODE, "prog": f"sahs {self.verb}"}
        with warnings.catch_warnings():  # `sahs <verb>` always hands LightningCLI its own arguments
            warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
            cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs=parser_kwargs, run=False, args=args,
                          verb=self.verb if new_run else None)
        self._parser = cli.parser
        init = cli.config_init
        init["trainer"]["logger"] = list(cli.trainer.loggers)
        return cli.config, init, cli.run_dir

    def _options(self, config, init) -> Any:
        if self.options_class is None:
            return None
        options = init[self.verb]
        if not isinstance(options, self.options_class):  # a section jsonargparse left as a Namespace
            options = self.options_class(**config[self.verb].as_dict())
        return options

    def _run(self, config, init, run_dir: Path | None, args: list[str]) -> Run:
        from sahs.callbacks import ActivationExtraction

        trainer = init["trainer"]
        callbacks = trainer.get("callbacks") or []
        extraction = next((c for c in callbacks if isinstance(c, ActivationExtraction)), None)
        loggers = trainer.get("logger")
        loggers = [] if loggers is None or isinstance(loggers, bool) else (
            loggers if isinstance(loggers, list) else [loggers])
        seed = config.get("seed_everything")
        try:  # parsed, so valid; JSON reads back the same plain values as YAML, in a fraction of the time
            plain = json.loads(self._parser.dump(config, format=PLAIN_JSON, skip_none=False, skip_validation=True))
        except TypeError:  # a value that only YAML holds as it is (an integer key, a date...)
            plain = yaml.safe_load(self._parser.dump(config, skip_none=False, skip_validation=True))
        extraction_config = [c for c in plain["trainer"].get("callbacks") or []
                             if c.get("class_path", "").endswith("ActivationExtraction")]
        run = Run(init["data"], init["model"], Path(plain["trainer"]["default_root_dir"] or "."), extraction,
                  seed if isinstance(seed, int) else 0, loggers,
                  {key: config[f"trainer.{key}"] for key in ("accelerator", "devices", "num_nodes", "strategy")},
                  run_dir, plain, yaml.safe_dump(extraction_config), args, self._parser)
        if run.dir is not None:
            run.save_config()
        return run


def _can_read_once(parser) -> bool:
    """Whether this jsonargparse has the steps of ``parse_args`` that ``FixedArgs`` calls one by one (they are
    not public API: another version falls back to ``parse_args``, which gives the same config)."""
    try:
        from jsonargparse._subcommands import parse_kwargs_context  # noqa: F401
    except ImportError:
        return False
    steps = ("_parse_common", "_parse_defaults_and_environ", "_parse_known_args_internal", "_positional_optionals")
    return all(callable(getattr(parser, step, None)) for step in steps)


_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_KEY = re.compile(r"[A-Za-z_][\w.]*")


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


class FixedArgs:
    """The leading arguments that every run of a sweep shares, applied once to a namespace.

    Arguments apply in order to one namespace, so each run applies only its own arguments to a copy of
    this one, then fills defaults, resolves and validates the whole as ``parse_args`` does. Interpolations
    (``${trainer.default_root_dir}``) that the run's arguments cannot change (they set neither the key
    that holds one nor a key it refers to) take the values they resolved to once here, which spares
    OmegaConf's round trip of the whole config per run; any other case resolves in full.
    """

    def __init__(self, parser, head: tuple[str, ...]) -> None:
        self.parser, self.head = parser, head
        self.namespace = _apply_args(parser, list(head), parser._parse_defaults_and_environ())
        self.resolved: dict[str, Any] | None = None  # interpolated key: its resolved value
        self.references: set[str] = set()
        held = {key: value for key, value in self.namespace.items(branches=False) if "${" in str(value)}
        references = {ref.strip() for value in held.values() for ref in _REFERENCE.findall(str(value))}
        if not all(_KEY.fullmatch(ref) for ref in references):  # resolvers, relative keys: resolved in full
            return
        try:
            whole = parser._parse_common(cfg=self.namespace.clone(), env=None, defaults=True, skip_validation=True)
            self.resolved = {key: whole[key] for key in held}
        except Exception:  # noqa: BLE001 - the head alone need not be a valid config: resolve each run in full
            return
        self.references = set(references) | set(held)

    def _spared(self, rest: list[str]) -> bool:
        """Whether ``rest`` leaves every interpolation and what it refers to as they are."""
        if self.resolved is None:
            return False
        for arg in rest:
            if not arg.startswith("-"):
                continue  # a value
            key = arg[2:].split("=", 1)[0].rstrip("+") if arg.startswith("--") else ""
            if not _KEY.fullmatch(key) or key.split(".")[-1] in ("config", "print_config") or "${" in arg:
                return False
            if any(_related(key, ref) for ref in self.references):
                return False
        return True

    def parse(self, args: list[str]) -> Any:
        from jsonargparse import ActionConfigFile

        parser, rest = self.parser, args[len(self.head):]
        parser.args = list(args)
        config = _apply_args(parser, rest, self.namespace.clone())
        if self._spared(rest):
            spared = config.clone()
            for key, value in self.resolved.items():
                spared[key] = copy.deepcopy(value)
            if "${" not in str(spared) and self.resolved:
                # As OmegaConf's round trip leaves it: no metadata, no record of the config files read.
                config = spared.clone(with_meta=False)
                for action in parser._actions:
                    if isinstance(action, ActionConfigFile):
                        config.pop(action.dest, None)
        try:
            config = parser._parse_common(cfg=config, env=None, defaults=True, skip_validation=False)
        except (TypeError, KeyError, argparse.ArgumentError) as error:
            parser.error(str(error), error)
        return config if getattr(parser, "_default_meta", True) else config.clone(with_meta=False)


def _apply_args(parser, args: list[str], namespace) -> Any:
    """Apply command-line arguments to ``namespace`` in order, as ``parse_args`` does before resolving."""
    from jsonargparse._subcommands import parse_kwargs_context

    try:
        with parse_kwargs_context({"env": None, "defaults": True}):
            namespace, unknown = parser._parse_known_args_internal(args=args, namespace=namespace)
            namespace, unknown = parser._positional_optionals(namespace, unknown)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except (TypeError, KeyError, argparse.ArgumentError) as error:
        parser.error(str(error), error)
    return namespace


def parse(verb: str, argv: list[str], keep_logger: bool = False, new_run: bool = False) -> tuple[Any, Run]:
    """``RunParser(verb).parse(...)``: one run's config, parsed and built."""
    return RunParser(verb).parse(argv, keep_logger=keep_logger, new_run=new_run)
