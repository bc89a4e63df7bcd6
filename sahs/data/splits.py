"""Seeded splits that keep every stratum's share in every part."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def stratified_split(strata: Sequence[str], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, torch.Tensor]:
    """Indices of train/val/test; each stratum (e.g. ``"1/figstep"``) is split in the given shares."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for stratum in sorted(groups):
        members = torch.tensor(groups[stratum])[torch.randperm(len(groups[stratum]), generator=generator)]
        n_test = round(len(members) * test_fraction)
        n_val = round(len(members) * val_fraction)
        parts["test"] += members[:n_test].tolist()
        parts["val"] += members[n_test:n_test + n_val].tolist()
        parts["train"] += members[n_test + n_val:].tolist()
    return {name: torch.tensor(sorted(index), dtype=torch.long) for name, index in parts.items()}
