"""DataModule over an activation cache: selected heads only, seeded stratified splits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from sahs.data.cache import ActivationCache, CacheMismatchError, fingerprint_diff
from sahs.data.selection import FeatureSelection, describe_heads, model_name, without_data_keys
from sahs.data.rankings import RankingStore
from sahs.data.splits import split_rows
from sahs.errors import UserError
from sahs.eval.probes import HeadRanking


class DataConfigError(UserError, ValueError):
    """A ``data:`` setting that cannot work, named with its fix."""


def check_selection(heads: list | None, layers: list | None, top_k: int | None, val_fraction: float,
                    test_fraction: float) -> None:
    """Refuse head selections and splits that would fail later or be silently ignored."""
    if heads is not None and len(heads) == 0:
        raise DataConfigError("data.heads is empty: list [layer, head] pairs, or leave it unset (null) "
                              "to use every cached head")
    if layers is not None and len(layers) == 0:
        raise DataConfigError("data.layers is empty: list layers, or leave it unset (null) for every cached layer")
    if heads is not None and top_k is not None:
        raise DataConfigError("data.heads and data.top_k are both set: heads fixes the heads, top_k would "
                              "rank them on the training split; unset one of the two")
    if top_k is not None and top_k < 1:
        raise DataConfigError(f"data.top_k must be at least 1, got {top_k}")
    if not 0 < val_fraction < 1:
        raise DataConfigError(
            f"data.val_fraction is {val_fraction}: the detector's threshold (95% TPR) and the best checkpoint "
            "are chosen on the validation split, so it must be in (0, 1) (the default is 0.15)")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataConfigError(f"data.val_fraction + data.test_fraction is {val_fraction + test_fraction}: "
                              "leave some prompts for training (the sum must be below 1)")


class ActivationDataModule(L.LightningDataModule):
    """Features are the concatenated activations of the selected heads: ``[prompts, heads * head_dim]``.

    Validation and test batches also carry each prompt's attack family, as an index into
    ``families``, so that the detector module can report figures per family without knowing the cache.

    ``selection`` describes the features (heads in order, cache fingerprint, split); ``adopt`` takes a trained
    detector's selection back, so that validate/test/predict with a checkpoint read the heads it was trained on.
    """

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
        predict_split: Literal["all", "train", "val", "test"] = "all",
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
            predict_split: The prompts ``sahs predict`` scores: the whole cache or one split.
        """
        super().__init__()
        check_selection(heads, layers, top_k, val_fraction, test_fraction)
        self.save_hyperparameters()
        self.cache_dir = cache_dir
        self.cache: ActivationCache | None = None
        self.selected_heads: list[tuple[int, int]] = []
        self.ranking: HeadRanking | None = None
        self.splits: dict[str, torch.Tensor] = {}
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.adopted: FeatureSelection | None = None  # a trained detector's heads, which override the config's
        self.families: list[str] = []  # attack family names, sorted
        self.family_index: torch.Tensor | None = None  # [prompts] index into ``families``

    def setup(self, stage: str | None = None) -> None:
        # The extraction callback may fill the cache after this hook; it calls ``load`` itself then.
        if self.cache is None and (Path(self.cache_dir) / "manifest.json").exists():
            self.load()

    def load(self) -> None:
        """Read the selected heads from the cache and split the prompts."""
        cache = ActivationCache(self.cache_dir)
        self.labels = cache.labels
        names, index = np.unique(np.asarray(cache.column("attack"), dtype=str), return_inverse=True)
        self.families, self.family_index = [str(name) for name in names], torch.from_numpy(index.reshape(-1))
        self.splits = self._split(cache)
        if self.adopted is not None:
            self._check_cache(cache, self.adopted)
        self.selected_heads = self._select_heads(cache)
        self.features = cache.read(self.selected_heads).flatten(1)  # [prompts, heads * head_dim]
        self.cache = cache

    def _select_heads(self, cache: ActivationCache) -> list[tuple[int, int]]:
        hp = self.hparams
        if self.adopted is not None:
            return list(self.adopted.heads)
        num_heads, cached = cache.layout["num_heads"], list(cache.layers)
        holds = f"the cache at {self.cache_dir} holds layers {cached}, {num_heads} heads each"
        if hp.heads is not None:  # checked here too: a first run learns the layout only once it has extracted
            bad = [list(pair) for pair in hp.heads if pair[0] not in cached or not 0 <= pair[1] < num_heads]
            if bad:
                raise DataConfigError(f"data.heads names {bad[:3]}, not in the cache ({holds}): pick [layer, head] "
                                      "pairs among them")
            return [tuple(pair) for pair in hp.heads]
        layers = self.candidate_layers(cache)
        missing = [layer for layer in layers if layer not in cached]
        if missing:
            raise DataConfigError(f"data.layers names layers {missing} that are not in the cache ({holds})")
        if hp.top_k is not None and hp.top_k > len(layers) * num_heads:
            candidates = len(layers) * num_heads
            raise DataConfigError(f"data.top_k must be in [1, {candidates}], got {hp.top_k}: there are {candidates} "
                                  f"heads to choose from ({holds})")
        if hp.top_k is None:
            return [(layer, head) for layer in layers for head in range(cache.layout["num_heads"])]
        # Heads are ranked on the training split only: validation and test never choose them. The
        # ranking is kept beside the cache and reused by every run with the same rows and settings.
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
            if "val" not in given:
                raise DataConfigError(f"the prompt set of {self.cache_dir} brings its own split without a 'val' "
                                      "part: the threshold and the best checkpoint are chosen on validation")
            return {name: torch.tensor([i for i, s in enumerate(given) if s == name]) for name in ("train", "val", "test")}
        hp = self.hparams
        train, val, test = split_rows(cache.labels, [hp.val_fraction, hp.test_fraction], hp.seed,
                                      attacks=cache.column("attack"), groups=self.column("group", cache),
                                      part="the cached prompts")
        return {"train": train, "val": val, "test": test}

    def _split_spec(self, cache: ActivationCache) -> dict[str, Any]:
        if all(name in ("train", "val", "test") for name in cache.column("split")):
            return {"given": "by the prompt set"}
        hp = self.hparams
        return {"seed": hp.seed, "val_fraction": hp.val_fraction, "test_fraction": hp.test_fraction}

    @property
    def selection(self) -> FeatureSelection:
        """The features as a detector records them: heads in order, head layout, cache fingerprint, split."""
        cache = self._require_loaded()
        layout = {key: value for key, value in cache.layout.items() if key != "layers"}
        return FeatureSelection(self.selected_heads, layout, cache.fingerprint or {}, self._split_spec(cache))

    def adopt(self, selection: FeatureSelection) -> None:
        """Read exactly ``selection``'s heads (a trained detector's), instead of the configured choice.

        Refuses a configured ``heads`` / ``layers`` / ``top_k`` that would give other heads or another order,
        and a cache made by another model or extraction setting; warns when the split differs from the one
        the detector was trained on, since validation and test rows may then overlap its training rows.
        """
        if selection == self.adopted:
            return
        self._check_configured(selection)
        self.adopted = selection
        if self.cache is not None:
            self._check_cache(self.cache, selection)
            if self.selected_heads != selection.heads:
                self.selected_heads = list(selection.heads)
                self.features = self.cache.read(self.selected_heads).flatten(1)

    def _check_configured(self, selection: FeatureSelection) -> None:
        hp, stored = self.hparams, selection.heads
        if hp.heads is not None:
            configured, option = [tuple(pair) for pair in hp.heads], "data.heads"
        elif hp.layers is not None and hp.top_k is None:
            num_heads = selection.layout["num_heads"]
            configured, option = [(layer, head) for layer in hp.layers for head in range(num_heads)], "data.layers"
        else:
            configured, option = None, "data.top_k"
        wrong_top_k = hp.top_k is not None and (hp.top_k != len(stored) or
                                                (hp.layers is not None and not set(selection.layers) <= set(hp.layers)))
        if (configured is not None and configured != stored) or (configured is None and wrong_top_k):
            chosen = describe_heads(configured) if configured is not None else f"top_k={hp.top_k} of layers {hp.layers}"
            raise DataConfigError(f"{option} selects {chosen} but the checkpoint's detector was trained on "
                             f"{describe_heads(stored)}, in that order: drop the selection from the config to "
                             "use the checkpoint's heads")

    def _check_cache(self, cache: ActivationCache, selection: FeatureSelection) -> None:
        changed = fingerprint_diff(without_data_keys(selection.fingerprint), without_data_keys(cache.fingerprint))
        if changed:
            raise CacheMismatchError(
                f"the detector was trained on activations of {model_name(selection.fingerprint)} but the cache at "
                f"{cache.root} holds {model_name(cache.fingerprint)} (differs: {', '.join(changed)}): point "
                "data.cache_dir at a cache extracted with the detector's model and extraction settings")
        same_prompts = (cache.fingerprint or {}).get("prompts") == selection.fingerprint.get("prompts")
        split = self._split_spec(cache)
        if same_prompts and selection.split and split != selection.split:
            warnings.warn(f"the split {split} differs from the one this detector was trained with "
                          f"{selection.split}: validation and test rows may overlap its training rows "
                          "(set data.seed and the fractions as in training)", UserWarning, stacklevel=3)

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
        """Training batches are ``(x, y)``; evaluation batches ``(x, y, family index)``, the whole split at once."""
        x, y = self.split_tensors(split)
        if shuffle:
            dataset = TensorDataset(x, y.float())
        else:
            dataset = TensorDataset(x, y.float(), self.family_index[self.splits[split]])
        batch_size = self.hparams.batch_size if shuffle else max(len(y), 1)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers)

    def predict_rows(self) -> torch.Tensor:
        """Cache rows that ``predict`` scores, ascending: all, or those of ``predict_split``."""
        self._require_loaded()
        split = self.hparams.predict_split
        return torch.arange(len(self.labels)) if split == "all" else self.splits[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches ``(features, labels, cache rows)``: the rows tell a prediction writer which prompt each score is."""
        rows = self.predict_rows()
        return DataLoader(TensorDataset(self.features[rows], self.labels[rows].float(), rows),
                          batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
