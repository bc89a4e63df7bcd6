"""A trained detector as one self-contained record, in a checkpoint or an export folder.

The fields, described once here:

- ``features``: the heads in feature order, the model's head layout, the cache fingerprint (model
  identity, extraction settings) and the training split (``sahs.data.selection.FeatureSelection``);
- ``detector``: the detector's class path, constructor arguments and input width;
- ``threshold`` and ``threshold_rule``: the operating point and how validation chose it;
- ``feature_mean`` / ``feature_std``: the scaler fitted on the training split;
- ``weights``: the detector's state dict.

A Lightning checkpoint keeps the JSON part under ``checkpoint["sahs"]`` (written by
``DetectorModule.on_save_checkpoint``) and the tensors in its state dict. An export folder keeps the
JSON part, threshold and scaler included, in ``detector.json`` and the weights in
``detector.safetensors``; it loads with torch and safetensors alone (no Lightning).

Both forms are checked when read (``DetectorArtifactError`` names the file and the field): finite
weights, scaler and threshold, a positive std, heads in range and distinct, widths that agree. An export
also records the sha256 of its weights file and a checksum of both, so an edit that still fits (heads
reordered) is refused too.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from sahs.data.selection import FeatureSelection
from sahs.errors import UserError
from sahs.models.detectors import Detector

CHECKPOINT_KEY = "sahs"
EXPORT_JSON = "detector.json"
EXPORT_WEIGHTS = "detector.safetensors"
FORMAT = "sahs-detector"
FORMAT_VERSION = 2  # 2: an export records its weights' sha256 and a checksum
FIX = "re-export it with `sahs export --ckpt_path <checkpoint> --output <folder> --overwrite`"


class DetectorArtifactError(UserError, ValueError):
    """A checkpoint or export folder whose detector record is not one sahs wrote: names the file and field."""

    def __init__(self, source: str | os.PathLike[str], problem: str, fix: str = FIX):
        self.source, self.problem = str(source), problem
        super().__init__(f"{source}: {problem}; {fix}")


class DetectorMissingError(UserError, FileNotFoundError):
    """No checkpoint or export folder where one was named."""


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists), so that records compare equal after a round trip."""
    return json.loads(json.dumps(value))


def _checksum(record: dict[str, Any]) -> str:
    """sha256 of an export's JSON fields other than ``checksum`` (canonical JSON; the weights by their sha256)."""
    body = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def detector_spec(detector: Detector) -> dict[str, Any]:
    """What rebuilds ``detector`` without its weights: class path, constructor arguments, input width."""
    cls = type(detector)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(detector.get_params()),
            "in_features": detector.in_features}


def _detector_class(class_path: str) -> type[Detector]:
    """Resolve a stored class path. Only sahs' own modules are imported on demand; any other module must be
    imported by the caller first, so that reading a checkpoint never runs code it names."""
    module_name, _, name = class_path.rpartition(".")
    if module_name not in sys.modules and not module_name.startswith("sahs."):
        raise ValueError(f"detector class {class_path!r} is not from sahs and its module is not imported: "
                         f"`import {module_name}` before loading this detector")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise ValueError(f"{class_path!r} is not a sahs.models.detectors.Detector subclass")
    return cls


def build_detector(spec: dict[str, Any]) -> Detector:
    """A built (layers created, weights random) detector from ``detector_spec``'s record."""
    detector = _detector_class(spec["class_path"])(**spec["init_args"])
    detector.build(int(spec["in_features"]))
    return detector


@dataclass
class DetectorArtifact:
    """Everything needed to score a prompt from its head activations, and nothing about how it was trained."""

    features: FeatureSelection
    detector: dict[str, Any]
    """``detector_spec``: class path, init args, input width."""
    threshold: float
    threshold_rule: dict[str, Any]
    """e.g. ``{"rule": "tpr", "target_tpr": 0.95, "chosen_on": "val"}``."""
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    weights: dict[str, torch.Tensor] = field(repr=False)
    _network: Detector | None = field(default=None, init=False, repr=False, compare=False)

    # ---- the checkpoint form -------------------------------------------------------------------
    @staticmethod
    def checkpoint_record(features: FeatureSelection, detector: Detector, threshold_rule: dict[str, Any]) -> dict:
        """The JSON part a checkpoint keeps under ``CHECKPOINT_KEY``; tensors stay in the state dict."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "features": features.to_dict(),
                "detector": detector_spec(detector), "threshold_rule": _plain(threshold_rule)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str = "the checkpoint") -> DetectorArtifact:
        """The artifact of a loaded checkpoint, checked field by field."""
        record = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if record is None:
            raise DetectorArtifactError(source, "it has no sahs detector record (written by an older sahs, or "
                                        "not by DetectorModule)", "retrain it with `sahs fit`")
        state = checkpoint.get("state_dict")
        missing = [key for key in ("threshold", "feature_mean", "feature_std") if key not in (state or {})]
        if missing:
            raise DetectorArtifactError(source, f"state_dict lacks {missing}", "retrain it with `sahs fit`")
        weights = {key.removeprefix("detector."): value for key, value in state.items() if key.startswith("detector.")}
        artifact = cls._from_record(record, source, threshold=state["threshold"], mean=state["feature_mean"],
                                    std=state["feature_std"], weights=weights, prefix="sahs.")
        artifact.validate(source)
        return artifact

    @classmethod
    def read_checkpoint(cls, path: str | os.PathLike[str]) -> DetectorArtifact:
        """The artifact of a Lightning checkpoint file (read with torch; Lightning is not needed)."""
        if not Path(path).is_file():
            raise DetectorMissingError(f"no checkpoint at {path}: pass the .ckpt file a `sahs fit` run wrote "
                                       "(its run folder's checkpoints/, e.g. best-*.ckpt)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (torch raises many kinds for a file that is not a checkpoint)
            raise DetectorArtifactError(path, f"it is not a readable checkpoint ({type(error).__name__})",
                                        "pass the .ckpt file a `sahs fit` run wrote") from None
        return cls.from_checkpoint(checkpoint, source=str(path))

    @classmethod
    def _from_record(cls, record: Any, source: str, *, threshold: Any, mean: Any, std: Any,
                     weights: dict[str, torch.Tensor], prefix: str = "") -> DetectorArtifact:
        """Build from the JSON part, turning a missing or mistyped field into one line that names it."""
        if not isinstance(record, dict):
            raise DetectorArtifactError(source, "the detector record is not a JSON object")
        for key, kind in (("features", dict), ("detector", dict), ("threshold_rule", dict)):
            if not isinstance(record.get(key), kind):
                raise DetectorArtifactError(source, f"field {prefix}{key} is missing or not an object")
        features = record["features"]
        heads = features.get("heads")
        if not (isinstance(heads, list) and heads and all(
                isinstance(pair, list | tuple) and len(pair) == 2 and all(type(v) is int for v in pair) for pair in heads)):
            raise DetectorArtifactError(source, f"field {prefix}features.heads must be a non-empty list of "
                                        "[layer, head] integer pairs")
        layout = features.get("layout")
        if not isinstance(layout, dict) or not all(
                type(layout.get(key)) is int and layout[key] > 0 for key in ("num_layers", "num_heads", "head_dim")):
            raise DetectorArtifactError(source, f"field {prefix}features.layout needs positive integers "
                                        "num_layers, num_heads and head_dim")
        for key in ("fingerprint", "split"):
            if features.get(key) is not None and not isinstance(features[key], dict):
                raise DetectorArtifactError(source, f"field {prefix}features.{key} is not an object")
        for key in ("model", "extraction"):
            if (features.get("fingerprint") or {}).get(key) is not None and not isinstance(features["fingerprint"][key], dict):
                raise DetectorArtifactError(source, f"field {prefix}features.fingerprint.{key} is not an object")
        spec = record["detector"]
        if not isinstance(spec.get("class_path"), str) or not isinstance(spec.get("init_args"), dict) \
                or type(spec.get("in_features")) is not int:
            raise DetectorArtifactError(source, f"field {prefix}detector needs class_path, init_args and an "
                                        "integer in_features")
        try:
            tensors = [torch.as_tensor(value, dtype=torch.float32) for value in (threshold, mean, std)]
        except (TypeError, ValueError, RuntimeError):
            raise DetectorArtifactError(source, "the threshold or scaler is not numeric") from None
        return cls(FeatureSelection.from_dict(features), spec, tensors[0], record["threshold_rule"],
                   tensors[1], tensors[2], weights)

    def validate(self, source: str | os.PathLike[str]) -> None:
        """Refuse values that would score wrongly or not at all: each check names its field."""
        selection, width = self.features, self.features.num_features
        layout = selection.layout
        out = [pair for pair in selection.heads
               if not (0 <= pair[0] < layout["num_layers"] and 0 <= pair[1] < layout["num_heads"])]
        if out:
            raise DetectorArtifactError(source, f"field features.heads has {out[:3]} outside the layout's "
                                        f"{layout['num_layers']} layers x {layout['num_heads']} heads")
        if len(set(selection.heads)) != len(selection.heads):
            raise DetectorArtifactError(source, "field features.heads lists a head twice")
        if self.detector["in_features"] != width:
            raise DetectorArtifactError(source, f"field detector.in_features is {self.detector['in_features']}, "
                                        f"but {len(selection.heads)} heads of {selection.head_dim} give {width}")
        threshold = self.threshold
        if not (threshold.ndim == 0 and math.isfinite(float(threshold))):
            raise DetectorArtifactError(source, f"field threshold must be one finite number, got {threshold.tolist()}")
        self.threshold = float(threshold)
        for name, values in (("scaler.mean", self.feature_mean), ("scaler.std", self.feature_std)):
            if values.shape != (width,):
                raise DetectorArtifactError(source, f"field {name} has shape {tuple(values.shape)}, expected ({width},)")
            if not torch.isfinite(values).all():
                raise DetectorArtifactError(source, f"field {name} holds NaN or infinite values "
                                            f"(first at index {int((~torch.isfinite(values)).nonzero()[0])})")
        if not (self.feature_std > 0).all():
            raise DetectorArtifactError(source, f"field scaler.std holds zero or negative values "
                                        f"(first at index {int((self.feature_std <= 0).nonzero()[0])})")
        for key, value in self.weights.items():
            if not torch.isfinite(value).all():
                raise DetectorArtifactError(source, f"weight {key} holds NaN or infinite values")
        try:
            with torch.random.fork_rng(devices=[]):  # building initialises layers: leave the caller's RNG as it was
                network = build_detector(self.detector)
            network.load_state_dict(self.weights)
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            first = " ".join(str(error).split())[:200]
            raise DetectorArtifactError(source, f"the weights do not fit field detector ({first})") from None
        self._network = network.eval().requires_grad_(False)

    # ---- the export form -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "features": self.features.to_dict(),
                "detector": _plain(self.detector), "threshold": self.threshold,
                "threshold_rule": _plain(self.threshold_rule),
                "scaler": {"mean": self.feature_mean.tolist(), "std": self.feature_std.tolist()}}

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``detector.json`` and ``detector.safetensors`` into ``folder`` (an existing detector only
        with ``overwrite``); both follow the umask, and the JSON records their checksum."""
        folder = Path(folder)
        if not overwrite and ((folder / EXPORT_JSON).exists() or (folder / EXPORT_WEIGHTS).exists()):
            raise DetectorArtifactError(folder, "it already holds an exported detector",
                                        "pass --overwrite to replace it, or another --output folder")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.weights.items()}
        data = save(tensors)  # bytes: written below with open(), whose mode follows the umask like the JSON's
        record = {**self.to_json(), "weights_sha256": hashlib.sha256(data).hexdigest()}
        record["checksum"] = _checksum(record)
        # One top-level field a line: readable, while the scaler's long lists stay on one line each.
        fields = ",\n".join(f" {json.dumps(key, allow_nan=False)}: {json.dumps(value, allow_nan=False)}"
                            for key, value in record.items())
        for name, payload in ((EXPORT_WEIGHTS, data), (EXPORT_JSON, ("{\n" + fields + "\n}\n").encode())):
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(payload)
                os.replace(tmp, folder / name)
            except OSError as error:  # disk full, quota, permissions: one line, no half-written file
                tmp.unlink(missing_ok=True)
                raise DetectorArtifactError(folder / name, f"cannot be written ({error.strerror or error})",
                                            "free space or choose another --output") from None
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DetectorArtifact:
        """An export folder, every field checked and the checksum compared; ``DetectorArtifactError`` otherwise."""
        folder = Path(folder)
        if not (folder / EXPORT_JSON).is_file() or not (folder / EXPORT_WEIGHTS).is_file():
            raise DetectorMissingError(f"{folder} is not an exported detector (needs {EXPORT_JSON} and "
                                       f"{EXPORT_WEIGHTS}): write one with `sahs export --ckpt_path P --output {folder}`")
        source = folder / EXPORT_JSON
        try:
            record = json.loads(source.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise DetectorArtifactError(source, f"it is not valid JSON ({error})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
            found = (record.get("format"), record.get("format_version")) if isinstance(record, dict) else (None, None)
            raise DetectorArtifactError(source, f"it is format {found[0]!r} version {found[1]}; this sahs reads "
                                        f"{FORMAT!r} version {FORMAT_VERSION}")
        weights_path = folder / EXPORT_WEIGHTS
        data = weights_path.read_bytes()
        try:
            weights = load(data)
        except Exception as error:  # noqa: BLE001  (safetensors raises its own error for a damaged file)
            raise DetectorArtifactError(weights_path, f"it is not a readable safetensors file ({error})") from None
        scaler = record.get("scaler")
        if not isinstance(scaler, dict) or not {"mean", "std"} <= set(scaler):
            raise DetectorArtifactError(source, "field scaler needs mean and std")
        if "threshold" not in record:
            raise DetectorArtifactError(source, "field threshold is missing")
        artifact = cls._from_record(record, str(source), threshold=record["threshold"], mean=scaler["mean"],
                                    std=scaler["std"], weights=weights)
        artifact.validate(source)
        if record.get("weights_sha256") != hashlib.sha256(data).hexdigest():
            raise DetectorArtifactError(weights_path, "it is not the weights file this detector.json was exported "
                                        "with (field weights_sha256)")
        if record.get("checksum") != _checksum(record):
            raise DetectorArtifactError(source, "it does not match its field checksum (edited after export)")
        return artifact

    # ---- scoring -------------------------------------------------------------------------------
    @property
    def network(self) -> Detector:
        """The detector with its weights, in eval mode (built on first use)."""
        if self._network is None:
            network = build_detector(self.detector)
            network.load_state_dict(self.weights)
            self._network = network.eval().requires_grad_(False)
        return self._network

    def to(self, device: torch.device | str) -> DetectorArtifact:
        """Move the scaler and the network (in place) to ``device``."""
        self.feature_mean, self.feature_std = self.feature_mean.to(device), self.feature_std.to(device)
        self.network.to(device)
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor | Any) -> torch.Tensor:
        """Malicious probability ``[n]`` for features ``[n, heads * head_dim]`` in ``features.heads`` order
        (a tensor or anything ``torch.as_tensor`` takes, e.g. a numpy array). A row whose score is not finite
        stays NaN: a guard flags it."""
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[1] != self.features.num_features:
            raise ValueError(f"features must be [n, {self.features.num_features}] "
                             f"({len(self.features.heads)} heads of {self.features.head_dim}), got {tuple(features.shape)}")
        features = features.to(self.feature_mean.device, torch.float32)
        return torch.sigmoid(self.network((features - self.feature_mean) / self.feature_std))
