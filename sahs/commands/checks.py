"""Settings checked before a run does any work (no folder made, no cache read, nothing trained).

Each check raises ``SettingsError``, one line naming the key, what is wrong and the fix: a sweep
definition given as a run config, a missing checkpoint, heads or a ``top_k`` the cache cannot give,
a W&B logger without a login.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sahs.errors import UserError

# ``--ckpt_path`` values that Lightning resolves itself (no file to check).
CKPT_WORDS = (None, "best", "last", "hpc", "registry")
SWEEP_KEYS = ("method", "parameters")


class SettingsError(UserError, ValueError):
    """A run setting that cannot work, found before the run starts."""


def config_files(argv: Sequence[str]) -> list[str]:
    """The files named by ``--config`` / ``-c`` on a command line."""
    found = []
    for index, arg in enumerate(argv):
        if arg.startswith(("--config=", "-c=")):
            found.append(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and index + 1 < len(argv):
            found.append(argv[index + 1])
    return found


def check_not_a_sweep(argv: Sequence[str], verb: str) -> None:
    """A W&B sweep definition (``method``, ``parameters``) given where a run config belongs."""
    for name in config_files(argv):
        try:
            loaded = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports a missing or malformed file itself
        if isinstance(loaded, dict) and all(key in loaded for key in SWEEP_KEYS):
            raise SettingsError(f"{name} is a sweep definition (it has {' and '.join(SWEEP_KEYS)}), not a run "
                                f"config: run it with `sahs sweep {name}`, or give `sahs {verb}` the run config "
                                "it names (its --config)")


def check_checkpoint(ckpt_path: Any) -> None:
    if ckpt_path in CKPT_WORDS:
        return
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise SettingsError(f"--ckpt_path {ckpt_path}: {what}; pass the .ckpt file a `sahs fit` run wrote "
                            "(<run folder>/checkpoints/best-*.ckpt)")


def cache_layout(cache_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The head layout of a finished cache (``layers``, ``num_heads``), or None when there is none yet.

    Only read, not verified: a damaged cache is reported (and repaired) by the cache's own checks.
    """
    try:
        layout = json.loads((Path(cache_dir) / "manifest.json").read_text())["layout"]
        return {"layers": [int(layer) for layer in layout["layers"]], "num_heads": int(layout["num_heads"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pairs(heads: Iterable) -> str:
    return "[" + ", ".join(f"[{layer}, {head}]" for layer, head in heads) + "]"


def check_heads(layout: dict[str, Any], where: str, heads: list | None, layers: list | None,
                top_k: int | float | None, top_k_key: str = "data.top_k") -> None:
    """``data.heads``, ``data.layers`` and a head count against the heads a cache holds."""
    cached, num_heads = list(layout["layers"]), int(layout["num_heads"])
    holds = f"the cache at {where} holds layers {cached}, {num_heads} heads each"
    if layers is not None and (missing := [layer for layer in layers if layer not in cached]):
        raise SettingsError(f"data.layers {missing} are not in the cache: {holds}; choose layers among them "
                            "(or extract those layers: extraction.layers)")
    if heads is not None:
        bad = [(layer, head) for layer, head in heads if layer not in cached or not 0 <= head < num_heads]
        if bad:
            raise SettingsError(f"data.heads {_pairs(bad[:5])} are not in the cache: {holds} (heads 0 to "
                                f"{num_heads - 1}); choose [layer, head] pairs among them")
    candidates = len(cached if layers is None else layers) * num_heads
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > candidates:
        among = "" if layers is None else f" of data.layers {list(layers)}"
        raise SettingsError(f"{top_k_key} must be in [1, {candidates}], got {top_k}: there are {candidates} "
                            f"heads{among} to choose from ({holds})")


def check_wandb(loggers: Any) -> None:
    """An online W&B logger needs a login; say so before anything runs, not from inside ``wandb.init``."""
    specs = loggers if isinstance(loggers, list) else [loggers]
    online = []
    for spec in specs:
        class_path = str(getattr(spec, "class_path", "") or "")
        if not class_path.endswith("WandbLogger"):
            continue
        init = getattr(spec, "init_args", None)
        offline = bool(getattr(init, "offline", False)) or getattr(init, "mode", None) in ("offline", "disabled")
        if not offline:
            online.append(spec)
    if not online or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except TypeError:  # an older wandb without ``prompt``: its own error comes when the run starts
        return
    if not logged_in:
        wandb.teardown()  # the check read wandb's settings into its process-wide state: leave none behind
        raise SettingsError("trainer.logger is a WandbLogger but W&B has no login: run `wandb login` (or set "
                            "WANDB_API_KEY), or log offline with WANDB_MODE=offline or --trainer.logger.offline true")


def _extraction_rebuilds(callbacks: Iterable[Any]) -> bool:
    return any(type(c).__name__ == "ActivationExtraction" and getattr(c, "on_mismatch", None) == "rebuild"
               for c in callbacks or [])


def _check_extracted_layers(callbacks: Iterable[Any], heads: list | None, layers: list | None) -> None:
    """Before a first extraction: heads or layers of model layers that ``extraction.layers`` leaves out."""
    extraction = next((c for c in callbacks or [] if type(c).__name__ == "ActivationExtraction"), None)
    kept = getattr(getattr(extraction, "extraction", None), "layers", None)
    if not kept:
        return
    wanted = {int(layer) for layer in layers or []} | {int(layer) for layer, _ in heads or []}
    if missing := sorted(wanted - {int(layer) for layer in kept}):
        key = "data.heads" if heads is not None else "data.layers"
        raise SettingsError(f"{key} names layers {missing} that the extraction does not keep "
                            f"(extraction.layers {list(kept)}): add them there or choose among those")


def check_run(config: Any, init: Any, verb: str | None, extra_top_k: tuple[str, Any] | None = None) -> None:
    """Every check of a parsed run config (``config``) and its instantiated classes (``init``).

    ``extra_top_k`` is a verb's own head count (``("loao.top_k", 8)``), checked like ``data.top_k``.
    A checkpoint's heads are taken first (validate/test/predict), so a selection that disagrees is named.
    """
    from sahs.models.artifact import DetectorArtifact

    datamodule = init["data"]
    ckpt_path = config.get("ckpt_path")
    check_checkpoint(ckpt_path)
    if ckpt_path not in CKPT_WORDS and verb in ("validate", "test", "predict"):
        datamodule.adopt(DetectorArtifact.read_checkpoint(ckpt_path).features)
    if not config.get("sweep.offline"):  # `sahs sweep --offline`: its runs all log offline, whatever the config says
        check_wandb(config.get("trainer.logger"))
    if datamodule.adopted is not None or _extraction_rebuilds(init["trainer"].get("callbacks")):
        return  # the checkpoint fixes the heads / the cache may be rebuilt with another layout
    layout = cache_layout(datamodule.cache_dir)
    hp = datamodule.hparams
    if layout is None:
        _check_extracted_layers(init["trainer"].get("callbacks"), hp.heads, hp.layers)
        return
    check_heads(layout, str(datamodule.cache_dir), hp.heads, hp.layers, hp.top_k)
    if extra_top_k is not None and extra_top_k[1] is not None:
        top_k = extra_top_k[1]
        top_k = int(top_k) if isinstance(top_k, float) and top_k >= 1 else top_k
        check_heads(layout, str(datamodule.cache_dir), None, hp.layers, top_k, extra_top_k[0])
