"""Synthetic activation caches: features in which chosen heads carry the label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sahs.data import cache as cache_io


def planted_features(n: int = 400, layers: int = 3, heads: int = 4, head_dim: int = 8,
                     signal_heads: Sequence[tuple[int, int]] = ((1, 2),), strength: float = 3.0,
                     attacks: Sequence[str] = ("text", "figstep", "template"), seed: int = 0):
    """``(features [n, layers, heads, head_dim], labels [n], attacks)``; noise except the signal heads."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, layers, heads, head_dim, generator=generator)
    direction = torch.randn(head_dim, generator=generator)
    for layer, head in signal_heads:
        features[:, layer, head] += strength * (2 * labels[:, None] - 1) * direction / direction.norm()
    attack = [attacks[(i // 2) % len(attacks)] for i in range(n)]
    return features, labels, attack


def write_cache(root: Path, features: torch.Tensor, labels: torch.Tensor, attacks: Sequence[str],
                shard_size: int = 128, splits: Sequence[str] | None = None,
                groups: Sequence[str] | None = None, model: str = "synthetic") -> None:
    """A finished cache in the on-disk format, as an extraction of ``model`` would leave it; ``splits`` fixes
    each row's split, ``groups`` names each row's request (each row its own when None)."""
    n, layers, heads, head_dim = features.shape
    fingerprint = {"format_version": cache_io.FORMAT_VERSION, "model": {"name": model}}
    cache_io.prepare_folder(root, fingerprint, rebuild=False)
    layout = {"num_layers": layers, "num_heads": heads, "head_dim": head_dim, "layers": list(range(layers)),
              "family": "synthetic"}
    writer = cache_io.ShardWriter(root, layout, shard_size=shard_size, dtype=torch.float32)
    ids = [f"s{i:05d}" for i in range(n)]
    writer.add(ids, features)
    writer.close()
    records = [{"id": i, "label": int(y), "attack": a, "source": "synthetic", "category": "none", "group": g}
               for i, y, a, g in zip(ids, labels.tolist(), attacks, groups if groups is not None else ids)]
    for record, split in zip(records, splits or []):
        record["split"] = split
    cache_io.write_manifest(root, records)
