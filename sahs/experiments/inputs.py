"""What an experiment reads from an activation cache, read once and shared by every run that needs it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sahs.data.cache import ActivationCache
from sahs.data.datamodule import ActivationDataModule
from sahs.data.rankings import RankingStore


@dataclass(frozen=True)
class LoaoInputs:
    """Every head of some model layers for all prompts, with the columns the folds are built from."""

    features: torch.Tensor  # [prompts, len(layers), heads, head_dim]
    labels: torch.Tensor  # [prompts]
    attacks: np.ndarray  # [prompts] attack family
    groups: np.ndarray  # [prompts] request id: one request's forms stay on one side
    layers: list[int]  # model layer of each entry of the features' layer axis
    head_dim: int
    rankings: RankingStore | None = None  # the cache's head rankings: computed once, then reused
    ids: np.ndarray | None = None  # [prompts] prompt id, for each run's scores.csv

    def select_layers(self, layers: list[int]) -> LoaoInputs:
        """The same prompts with only ``layers`` (model numbers) on the layer axis."""
        if list(layers) == self.layers:
            return self
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(f"layers {missing} are not in the cache, which holds layers {self.layers}")
        index = torch.tensor([self.layers.index(layer) for layer in layers])
        return replace(self, features=self.features.index_select(1, index), layers=list(layers))


class InputStore:
    """Reads each cache once: the runs of a sweep share one read and take their layers from it.

    The features keep the stored dtype (float16 from an extraction): folds convert what they use. Each
    cache comes with its ``RankingStore``, so runs that vary only the head count, the detector or its
    regularization rank no head again.

    A cache is known by its folder and by ``key``, the extraction settings that made it: a run whose
    extraction differs fills its cache again (through the caller) rather than reading a stale one.
    """

    def __init__(self, every_layer: bool = True) -> None:
        """
        Args:
            every_layer: Read every cached layer (a sweep may vary the layers); otherwise only the first
                run's candidate layers, which is all a single run needs.
        """
        self.every_layer = every_layer
        self._read: dict[tuple[str, str], tuple[ActivationCache, LoaoInputs]] = {}

    @staticmethod
    def _key(datamodule: ActivationDataModule, key: str) -> tuple[str, str]:
        return str(Path(datamodule.cache_dir).expanduser().resolve()), key

    def __contains__(self, item: tuple[ActivationDataModule, str]) -> bool:
        return self._key(*item) in self._read

    def get(self, datamodule: ActivationDataModule, key: str = "") -> LoaoInputs:
        """The candidate layers of ``datamodule`` (``data.layers``, else every cached layer) from its cache."""
        where = self._key(datamodule, key)
        if where not in self._read:
            cache = ActivationCache(datamodule.cache_dir)
            layers = list(cache.layers) if self.every_layer else datamodule.candidate_layers(cache)
            inputs = LoaoInputs(datamodule.read_layers(layers, cache, dtype=None), cache.labels,
                                datamodule.column("attack", cache), datamodule.column("group", cache),
                                layers, cache.layout["head_dim"], RankingStore.for_cache(cache),
                                datamodule.column("id", cache))
            self._read[where] = (cache, inputs)
        cache, inputs = self._read[where]
        return inputs.select_layers(datamodule.candidate_layers(cache))
