"""Synthetic head activations with a known answer: named heads carry the label."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

Features = tuple[torch.Tensor, torch.Tensor, np.ndarray]


def planted_heads(
    n: int = 400,
    layers: int = 4,
    heads: int = 6,
    head_dim: int = 8,
    signal: dict[tuple[int, int], float] | None = None,
    families: Sequence[str] = ("plain",),
    family_shift: float = 0.0,
    seed: int = 0,
) -> Features:
    """``features [n, layers, heads, head_dim]``, ``labels [n]``, ``attacks [n]``.

    Each ``(layer, head): strength`` in ``signal`` shifts that head's first dimension by ``strength``
    for malicious prompts; every family adds its own random offset (scaled by ``family_shift``) to
    all heads, as a rendering style would.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.randn(n, layers, heads, head_dim, generator=generator)
    for (layer, head), strength in ({(1, 2): 3.0} if signal is None else signal).items():
        features[:, layer, head, 0] += strength * labels
    family_index = torch.arange(n) % len(families)
    offsets = family_shift * torch.randn(len(families), layers, heads, head_dim, generator=generator)
    features += offsets[family_index]
    return features, labels, np.asarray(families)[family_index.numpy()]


@pytest.fixture
def make_features() -> Callable[..., Features]:
    return planted_heads
