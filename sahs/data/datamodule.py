"""DataModule over an activation cache: selected heads only, seeded stratified splits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from sahs.data.cache import ActivationCache
from sahs.data.splits import split_rows
from sahs.eval.probes import HeadRanking


class ActivationDataModule(L.LightningDataModule):
    """Features are the concatenated activations of the selected heads: ``[prompts, heads * head_dim]``."""

    def __init__(
        self,
        cache_dir: str = "outputs/cache/demo",
        heads: list[tuple[int, int]] | None = None,
        layers: list[int] | None = None,
        top_k: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            cache_dir: Folder of the activation cache (filled by ``sahs.callbacks.ActivationExtraction``).
            heads: Explicit ``[layer, head]`` pairs to use; overrides ``layers``.
            layers: Use every head of these layers; all cached layers when both are None.
            top_k: Keep the k heads (within ``layers``) whose per-head probe scores best on the training split.
            val_fraction: Share of prompts for validation (stratified by label and attack; a request's
                forms, when the prompt set groups them, stay on one side of every split).
            test_fraction: Share of prompts for test (stratified and grouped as validation).
            batch_size: Training batch size; validation and test use the whole split at once.
            num_workers: DataLoader workers (features are in memory, so 0 is usually fastest).
            seed: Seed of the split.
        """
        super().__init__()
        self.save_hyperparameters()
        self.cache_dir = cache_dir
        self.cache: ActivationCache | None = None
        self.selected_heads: list[tuple[int, int]] = []
        self.ranking: HeadRanking | None = None
        self.splits: dict[str, torch.Tensor] = {}
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        # The extraction callback may fill the cache after this hook; it calls ``load`` itself then.
        if self.cache is None and (Path(self.cache_dir) / "manifest.json").exists():
            self.load()

    def load(self) -> None:
        """Read the selected heads from the cache and split the prompts."""
        cache = ActivationCache(self.cache_dir)
        self.labels = cache.labels
        self.splits = self._split(cache)
        self.selected_heads = self._select_heads(cache)
        self.features = cache.read(self.selected_heads).flatten(1)  # [prompts, heads * head_dim]
        self.cache = cache

    def _select_heads(self, cache: ActivationCache) -> list[tuple[int, int]]:
        hp = self.hparams
        if hp.heads is not None:
            return [tuple(pair) for pair in hp.heads]
        layers = self.candidate_layers(cache)
        if hp.top_k is None:
            return [(layer, head) for layer in layers for head in range(cache.layout["num_heads"])]
        # Heads are ranked on the training split only: validation and test never choose them. The
        # ranking is kept beside the cache and reused by every run with the same rows and settings.
        from sahs.experiments.rankings import RankingStore  # the store serves experiments and this module

        store = RankingStore.for_cache(cache)
        features = self.read_layers(layers, cache, dtype=None)  # the stored dtype (float16), read in place
        self.ranking = store.rank(features, self.labels, rows=self.splits["train"], layers=layers, seed=hp.seed,
                                  attacks=self.column("attack", cache), groups=self.column("group", cache))
        return self.ranking.top(hp.top_k)

    def candidate_layers(self, cache: ActivationCache | None = None) -> list[int]:
        """Model layers whose heads may be selected: ``layers``, else every cached layer."""
        cache = cache or self._require_loaded()
        return list(cache.layers if self.hparams.layers is None else self.hparams.layers)

    def read_layers(self, layers: list[int], cache: ActivationCache | None = None,
                    dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Every head of ``layers`` for all prompts: ``[prompts, len(layers), heads, head_dim]``.

        ``dtype=None`` keeps the stored dtype (float16 from an extraction).
        """
        cache = cache or self._require_loaded()
        num_heads = cache.layout["num_heads"]
        heads = [(layer, head) for layer in layers for head in range(num_heads)]
        return cache.read(heads, dtype=dtype).view(len(cache), len(layers), num_heads, -1)

    def column(self, name: str, cache: ActivationCache | None = None) -> np.ndarray:
        """A per-prompt manifest column as strings; ``group`` falls back to the prompt id in older caches."""
        cache = cache or self._require_loaded()
        if name == "group" and "group" not in cache.columns:
            name = "id"  # every prompt a request of its own
        return np.asarray(cache.column(name), dtype=str)

    def _split(self, cache: ActivationCache) -> dict[str, torch.Tensor]:
        given = cache.column("split")
        if all(name in ("train", "val", "test") for name in given):  # the prompt set brings its own
            return {name: torch.tensor([i for i, s in enumerate(given) if s == name]) for name in ("train", "val", "test")}
        hp = self.hparams
        train, val, test = split_rows(cache.labels, [hp.val_fraction, hp.test_fraction], hp.seed,
                                      attacks=cache.column("attack"), groups=self.column("group", cache),
                                      part="the cached prompts")
        return {"train": train, "val": val, "test": test}

    def _require_loaded(self) -> ActivationCache:
        if self.cache is None:
            ActivationCache(self.cache_dir)  # raises the error that says how to make the cache
            self.load()
        return self.cache

    @property
    def num_features(self) -> int:
        self._require_loaded()
        return self.features.shape[1]

    @property
    def head_dim(self) -> int:
        return self._require_loaded().layout["head_dim"]

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [n, features], labels [n])`` of one split."""
        self._require_loaded()
        index = self.splits[split]
        return self.features[index], self.labels[index]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        x, y = self.split_tensors(split)
        batch_size = self.hparams.batch_size if shuffle else max(len(y), 1)
        return DataLoader(TensorDataset(x, y.float()), batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
