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
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sahs.data.selection import FeatureSelection
from sahs.models.detectors import Detector

CHECKPOINT_KEY = "sahs"
EXPORT_JSON = "detector.json"
EXPORT_WEIGHTS = "detector.safetensors"
FORMAT = "sahs-detector"
FORMAT_VERSION = 1


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists), so that records compare equal after a round trip."""
    return json.loads(json.dumps(value))


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
        record = checkpoint.get(CHECKPOINT_KEY)
        if record is None:
            raise ValueError(f"{source} has no sahs detector record (written by an older sahs, or not by "
                             "DetectorModule): retrain it with `sahs fit`")
        state = checkpoint["state_dict"]
        weights = {key.removeprefix("detector."): value for key, value in state.items() if key.startswith("detector.")}
        return cls(FeatureSelection.from_dict(record["features"]), record["detector"], float(state["threshold"]),
                   record["threshold_rule"], state["feature_mean"], state["feature_std"], weights)

    @classmethod
    def read_checkpoint(cls, path: str | os.PathLike[str]) -> DetectorArtifact:
        """The artifact of a Lightning checkpoint file (read with torch; Lightning is not needed)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: pass the .ckpt file a `sahs fit` run wrote")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_checkpoint(checkpoint, source=str(path))

    # ---- the export form -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "features": self.features.to_dict(),
                "detector": _plain(self.detector), "threshold": self.threshold,
                "threshold_rule": _plain(self.threshold_rule),
                "scaler": {"mean": self.feature_mean.tolist(), "std": self.feature_std.tolist()}}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``detector.json`` and ``detector.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: value.detach().cpu().contiguous() for key, value in self.weights.items()},
                  str(folder / EXPORT_WEIGHTS))
        # One top-level field a line: readable, while the scaler's long lists stay on one line each.
        fields = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in self.to_json().items())
        (folder / EXPORT_JSON).write_text("{\n" + fields + "\n}\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DetectorArtifact:
        folder = Path(folder)
        if not (folder / EXPORT_JSON).is_file() or not (folder / EXPORT_WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder} is not an exported detector (needs {EXPORT_JSON} and "
                                    f"{EXPORT_WEIGHTS}): write one with `sahs export --ckpt_path P --output {folder}`")
        record = json.loads((folder / EXPORT_JSON).read_text())
        if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / EXPORT_JSON} is format {record.get('format')!r} version "
                             f"{record.get('format_version')}; this sahs reads {FORMAT!r} version {FORMAT_VERSION}")
        scaler = record["scaler"]
        return cls(FeatureSelection.from_dict(record["features"]), record["detector"], float(record["threshold"]),
                   record["threshold_rule"], torch.tensor(scaler["mean"], dtype=torch.float32),
                   torch.tensor(scaler["std"], dtype=torch.float32), load_file(str(folder / EXPORT_WEIGHTS)))

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
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Malicious probability ``[n]`` for features ``[n, heads * head_dim]`` in ``features.heads`` order."""
        if features.ndim != 2 or features.shape[1] != self.features.num_features:
            raise ValueError(f"features must be [n, {self.features.num_features}] "
                             f"({len(self.features.heads)} heads of {self.features.head_dim}), got {tuple(features.shape)}")
        features = features.to(self.feature_mean.device, torch.float32)
        return torch.sigmoid(self.network((features - self.feature_mean) / self.feature_std))
