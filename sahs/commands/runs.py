"""Run folders and run identity: every run of every verb has its own folder, name, group and tags.

A run's folder is ``<trainer.default_root_dir>/<verb>/<run name>``: its resolved config
(``config.yaml``), its results, and the logs of every logger that was told to write into the root
(the usual ``save_dir: ${trainer.default_root_dir}``). A W&B logger also gets the run's name, its group
(the experiment or sweep), the verb as ``job_type`` and tags, and the full config as W&B config.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sahs.experiments.records import CONFIG_FILE

# Written into the folder of a run that failed, holding the error: such a folder is no finished run.
FAILED_FILE = "FAILED"

# A run's folder, inherited by the processes that a multi-device fit launches so that all ranks share it.
RUN_DIR_ENV = "SAHS_RUN_DIR"

# A CSV logger writing into a run's folder finds the run's config.yaml already there; the folder is the
# run's own (made for it), so Lightning's warning about an earlier run's logs does not apply.
warnings.filterwarnings("ignore", r"Experiment logs directory .* exists and is not empty")


@dataclass
class RunIdentity:
    """How a run is named and grouped (the ``run:`` section of every run config).

    Args:
        name: Name of the run: its folder under ``<root_dir>/<verb>/`` and its W&B name
            (default: the verb and the start time, e.g. ``loao-20250101-120000``).
        group: W&B group, the experiment or sweep the run belongs to (default: the run config's file name).
        tags: Extra W&B tags; the verb, the detector class and the model are always added.
    """

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def new_run_dir(root: str | os.PathLike, verb: str, name: str | None = None) -> Path:
    """Create ``<root>/<verb>/<name>``, adding ``-2``, ``-3``... to the name when that folder exists."""
    stem = name or f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not stem or "/" in stem or stem in (".", ".."):
        raise ValueError(f"run.name {name!r} is not a folder name; choose one without '/'")
    base = Path(root) / verb
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        path = base / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} holds too many runs named {stem!r}; choose another run.name")


def close_failed(run_dir: str | os.PathLike, reason: str) -> None:
    """After a run failed: remove its folder if the run left nothing in it but its config, else mark it ``FAILED``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    if all(path.name == CONFIG_FILE for path in run_dir.rglob("*") if not path.is_dir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        (run_dir / FAILED_FILE).write_text(reason.rstrip() + "\n")


def config_group(argv: Sequence[str]) -> str:
    """Default W&B group: the stem of the first ``--config`` file on the command line."""
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith(("--config=", "-c=")) else (
            argv[index + 1] if arg in ("--config", "-c") and index + 1 < len(argv) else None)
        if value:
            return Path(value).stem
    return "sahs"


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def run_tags(verb: str, config: Any, extra: Iterable[str] = ()) -> list[str]:
    """The verb, the detector class and the model name, plus the user's own tags (``config``: the parsed run config)."""
    tags = [verb]
    detector = config.get("model.detector")
    if getattr(detector, "class_path", None):
        tags.append(_short(detector.class_path))
    for callback in config.get("trainer.callbacks") or []:
        model = getattr(getattr(callback, "init_args", None), "model", None)
        if getattr(model, "name", None):
            tags.append(str(model.name))
    tags += [str(tag) for tag in extra]
    return list(dict.fromkeys(tag[:64] for tag in tags))  # W&B limits a tag to 64 characters


def place_run(config: Any, trainer: dict[str, Any], verb: str, argv: Sequence[str], inherit: bool = False) -> Path:
    """Make the run's folder and point the trainer, its loggers and its checkpoints into it.

    ``config`` is the parsed run config, ``trainer`` its instantiated ``trainer`` section (changed here).
    With ``inherit`` the folder is shared with the processes a multi-device run launches (``SAHS_RUN_DIR``).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    identity = RunIdentity(**config["run"].as_dict())
    root = config["trainer.default_root_dir"] or os.getcwd()
    inherited = os.environ.get(RUN_DIR_ENV) if inherit else None
    run_dir = Path(inherited) if inherited else new_run_dir(root, verb, identity.name)
    if inherit:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = place_loggers(config["trainer.logger"], root, run_dir, name=run_dir.name,
                                      group=identity.group or config_group(argv), job_type=verb,
                                      tags=run_tags(verb, config, identity.tags))
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.realpath(run_dir / "checkpoints")
    return run_dir


def _same_dir(path: Any, root: str | os.PathLike) -> bool:
    return path in (None, "", ".") or Path(path).expanduser().resolve() == Path(root).expanduser().resolve()


def place_loggers(logger: Any, root: str | os.PathLike, run_dir: Path, *, name: str, group: str,
                  job_type: str, tags: list[str]) -> Any:
    """The configured loggers, rebuilt to write into the run's folder and to carry the run's identity.

    ``logger`` is the parsed ``trainer.logger`` (``True``/``False``/``None``, a ``class_path``/``init_args``
    namespace, or a list of them). A logger whose ``save_dir`` is unset or the root writes into
    ``run_dir``; one given another folder keeps it. A W&B logger gets name, group, job type and tags
    (group and job type only where the config leaves them unset).
    """
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loggers.logger import Logger

    if logger is None or isinstance(logger, bool):
        return logger
    placed = []
    for spec in logger if isinstance(logger, list) else [logger]:
        if isinstance(spec, Logger):  # already an object (set from Python): leave it as given
            placed.append(spec)
            continue
        spec = spec.as_dict() if isinstance(spec, Namespace) else dict(spec)
        cls = _import(spec["class_path"])
        args = dict(spec.get("init_args") or {})
        relocate = _same_dir(args.get("save_dir"), root)
        if issubclass(cls, WandbLogger):
            if relocate:
                args.update(save_dir=str(run_dir), dir=None)
            args["name"] = name
            args["group"] = args.get("group") or group
            args["job_type"] = args.get("job_type") or job_type
            args["tags"] = list(dict.fromkeys([*tags, *(args.get("tags") or [])]))
        elif relocate:
            parameters = inspect.signature(cls).parameters
            args["save_dir"] = str(run_dir)
            if "name" in parameters and "version" in parameters:  # CSV / TensorBoard: no name/version_N below
                args.update(name="", version="")
        placed.append(cls(**args))
    return placed


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def wandb_loggers(loggers: Iterable[Any]) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_config(loggers: Iterable[Any], config: dict[str, Any]) -> None:
    """The full resolved config as W&B config (detector class and init args included)."""
    for logger in wandb_loggers(loggers):
        logger.experiment.config.update(config, allow_val_change=True)


def log_files(loggers: Iterable[Any], run_dir: Path, files: Iterable[Path], kind: str) -> None:
    """A run's result files as one W&B artifact named after the run (``<kind>-<run name>``)."""
    files = [Path(path) for path in files if Path(path).is_file()]
    if not files:
        return
    for logger in wandb_loggers(loggers):
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{kind}-{run_dir.name}"), type=kind)
        for path in files:
            artifact.add_file(str(path), name=str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else path.name)
        logger.experiment.log_artifact(artifact)


def finish(loggers: Iterable[Any], ok: bool = True) -> None:
    """Close every logger; a W&B run is finished (exit code 1 when the run failed) so the next one starts fresh."""
    for logger in loggers:
        logger.finalize("success" if ok else "failed")
    for logger in wandb_loggers(loggers):
        if logger._experiment is not None:  # never start a W&B run only to finish it
            logger.experiment.finish(exit_code=0 if ok else 1)
