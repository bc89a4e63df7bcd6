"""Head rankings computed once and reused: across the folds and runs of a sweep, and across processes.

A head ranking depends on the rows it is fitted on, the candidate layers, the probe settings and the
seed, and on nothing a sweep usually varies (top_k, the detector, its regularization). The store
keeps each ranking it computes as ``<cache_dir>/rankings/<key>.json``: the ``HeadRanking`` JSON
(no pickle), where ``key`` is the sha256 of everything the ranking depends on:

- the cache fingerprint (model, prompt set, extraction settings);
- the rows, in order: their prompt ids, labels, attack families and request groups (the probes'
  hold-out is stratified by family and keeps requests whole, so these decide the split too);
- the candidate layers, the probe settings (``l2``, hold-out share, standardization, tolerance,
  iterations), the seed, and the version of the ranking code.

A ranking is only ever read under the key of exactly these inputs, and the file records them again,
checked on reading, so a stale ranking is never used. The cache owns the ``rankings`` folder: a
rebuilt cache starts without it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sahs.eval.probes import HeadRanking, rank_heads

RANKINGS_DIR = "rankings"
# Bump when rank_heads' numbers change (solver, split, scoring): older files then stop matching.
RANKING_VERSION = 3
_PROBE_SETTINGS = ("holdout_fraction", "l2", "max_iter", "tol", "standardize")
_PROBE_DEFAULTS = {name: inspect.signature(rank_heads).parameters[name].default for name in _PROBE_SETTINGS}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RankingStore:
    """``rank(...)`` is ``rank_heads(...)``, computed once per distinct input and kept on disk.

    Args:
        directory: Folder of the ranking files (``<cache_dir>/rankings``); None keeps them in memory only.
        fingerprint: What produced the features (the cache fingerprint): part of every key.
        ids: Prompt id of every row of the features the store will be asked to rank.
    """

    def __init__(self, directory: str | Path | None, fingerprint: Any, ids: Sequence[str]) -> None:
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = _digest(json.dumps(fingerprint, sort_keys=True, default=str))
        self.ids = np.asarray(ids, dtype=str)
        self.computed = 0  # rankings this store had to compute
        self.reused = 0  # rankings it found (in memory or on disk)
        self._memory: dict[str, HeadRanking] = {}

    @classmethod
    def for_cache(cls, cache) -> RankingStore:
        """The store beside an ``ActivationCache``: ``<cache_dir>/rankings``, keyed by its fingerprint and ids."""
        return cls(Path(cache.root) / RANKINGS_DIR, cache.fingerprint, cache.column("id"))

    def inputs(self, labels: torch.Tensor, rows: torch.Tensor, *, layers: Sequence[int], attacks=None,
               groups=None, seed: int = 0, **probe: Any) -> dict[str, Any]:
        """Everything a ranking of ``rows`` depends on, as stored in its file."""
        unknown = sorted(set(probe) - set(_PROBE_SETTINGS))
        if unknown:
            raise TypeError(f"RankingStore.rank got settings it cannot key by: {unknown}")
        index = rows.numpy()
        columns = [self.ids[index], np.asarray(labels)[index].astype(str)]
        columns += [np.asarray(values, dtype=str)[index] for values in (attacks, groups) if values is not None]
        row_text = "\x1e".join("\x1f".join(column.tolist()) for column in columns)
        return {
            "version": RANKING_VERSION,
            "fingerprint": self.fingerprint,
            "rows": _digest(f"{attacks is not None}{groups is not None}\x1e{row_text}"),
            "n_rows": len(index),
            "layers": [int(layer) for layer in layers],
            "probe": {name: probe.get(name, default) for name, default in _PROBE_DEFAULTS.items()},
            "seed": int(seed),
        }

    def rank(self, features: torch.Tensor, labels: torch.Tensor, *, rows: torch.Tensor | None = None,
             layers: Sequence[int] | None = None, attacks=None, groups=None, seed: int = 0,
             **probe: Any) -> HeadRanking:
        """``rank_heads`` with the same arguments, read from the store when it already holds this ranking."""
        features, labels = torch.as_tensor(features), torch.as_tensor(labels).cpu()
        if len(self.ids) != len(labels):
            raise ValueError(f"the ranking store knows {len(self.ids)} prompt ids, "
                             f"the features have {len(labels)} rows: build it for these features")
        rows = torch.arange(len(labels)) if rows is None else torch.as_tensor(rows).cpu().long()
        layers = list(range(features.shape[1])) if layers is None else [int(layer) for layer in layers]
        device = probe.pop("device", None)
        probe.pop("heads_per_chunk", None)  # how the work is chunked does not change the ranking
        inputs = self.inputs(labels, rows, layers=layers, attacks=attacks, groups=groups, seed=seed, **probe)
        key = _digest(json.dumps(inputs, sort_keys=True))
        ranking = self._memory.get(key) or self._read(key, inputs)
        if ranking is not None:
            self.reused += 1
        else:
            ranking = rank_heads(features, labels, rows=rows, layers=layers, attacks=attacks, groups=groups,
                                 seed=seed, device=device, **probe)
            ranking.meta["store"] = inputs
            self.computed += 1
            self._write(key, ranking)
        self._memory[key] = ranking
        return ranking

    def _read(self, key: str, inputs: dict[str, Any]) -> HeadRanking | None:
        path = None if self.directory is None else self.directory / f"{key}.json"
        if path is None or not path.exists():
            return None
        try:
            ranking = HeadRanking.load(path)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable or cut short: rank again
            return None
        return ranking if ranking.meta.get("store") == inputs else None

    def _write(self, key: str, ranking: HeadRanking) -> None:
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(ranking.to_json())
            os.replace(tmp, self.directory / f"{key}.json")  # readers never see half a file
        except OSError as error:  # a read-only cache still ranks, it only cannot keep the result
            print(f"[sahs] could not keep the head ranking in {self.directory}: {error}")
