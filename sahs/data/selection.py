"""What a detector's features are: which heads in which order, read from which model, split how.

A ``FeatureSelection`` travels with every trained detector (checkpoint and export). The DataModule
hands it out after loading a cache and takes it back (``adopt``) to score with a trained detector; the
guard uses it to read the same heads from the live model. It is plain data: no cache, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Fingerprint keys that say which prompts were extracted or how they were stored, not what a feature
# means: a detector applies to a cache that differs only in these.
DATA_ONLY_KEYS = ("prompts", "extraction.layers", "extraction.cache_dtype")


def without_data_keys(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The fingerprint minus ``DATA_ONLY_KEYS``: the part two caches must share to feed one detector."""
    kept = {key: dict(value) if isinstance(value, dict) else value for key, value in (fingerprint or {}).items()}
    for dotted in DATA_ONLY_KEYS:
        *parents, leaf = dotted.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return kept


def model_name(fingerprint: dict[str, Any] | None) -> str:
    """The model a fingerprint names, for messages: ``name@revision`` or ``an unnamed model``."""
    model = (fingerprint or {}).get("model") or {}
    name = model.get("name") or "an unnamed model"
    return f"{name}@{model['revision']}" if model.get("revision") else str(name)


def describe_heads(heads: list[tuple[int, int]], shown: int = 6) -> str:
    """``[(1, 2), (0, 3), ...] (12 heads)``: short enough for a one-line error."""
    listed = ", ".join(f"({layer}, {head})" for layer, head in heads[:shown])
    more = ", ..." if len(heads) > shown else ""
    return f"[{listed}{more}] ({len(heads)} heads)"


@dataclass(frozen=True)
class FeatureSelection:
    """The features of a trained detector: concatenated ``head_dim``-wide blocks, one per head, in order."""

    heads: list[tuple[int, int]]
    """Model ``(layer, head)`` pairs in feature order."""
    layout: dict[str, Any]
    """The model's ``num_layers``, ``num_heads``, ``head_dim`` (and ``family``), as the cache records them."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """The activation cache's fingerprint, whole: model identity, prompt set, extraction settings."""
    split: dict[str, Any] = field(default_factory=dict)
    """How the prompts were split for training: seed and fractions, or that the prompt set gave the split."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", [(int(layer), int(head)) for layer, head in self.heads])
        if not self.heads:
            raise ValueError("a feature selection needs at least one (layer, head)")

    @property
    def head_dim(self) -> int:
        return int(self.layout["head_dim"])

    @property
    def num_features(self) -> int:
        return len(self.heads) * self.head_dim

    @property
    def layers(self) -> list[int]:
        """The model layers the heads come from, ascending."""
        return sorted({layer for layer, _ in self.heads})

    @property
    def model(self) -> dict[str, Any]:
        """The model identity recorded in the fingerprint (name, revision, config hash, dtype, ...)."""
        return dict(self.fingerprint.get("model") or {})

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(pair) for pair in self.heads], "layout": dict(self.layout),
                "fingerprint": self.fingerprint, "split": dict(self.split)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> FeatureSelection:
        missing = [key for key in ("heads", "layout") if key not in record]
        if missing:
            raise ValueError(f"a feature selection record lacks {missing}: it was not written by sahs")
        return cls([tuple(pair) for pair in record["heads"]], dict(record["layout"]),
                   dict(record.get("fingerprint") or {}), dict(record.get("split") or {}))
