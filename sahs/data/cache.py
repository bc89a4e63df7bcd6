"""The activation cache: extract once, train many times.

Layout of a cache folder::

    fingerprint.json            what produced it (model, prompt set, extraction settings)
    shards/r000-00000.safetensors   "activations" [rows, layers, heads, head_dim], one rank's rows
    shards/r000-00000.json          sidecar: prompt ids and the shard's sha256; written last, so a
                                    shard without a valid sidecar is unfinished and gets redone
    manifest.json               every prompt's id, label, attack, source, category, split, shard, row

Shards are written to a temporary name and renamed, so a killed extraction leaves only whole shards.
Reads are memory-mapped (safetensors) and touch only the pages of the heads asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
TENSOR = "activations"
OWN_ENTRIES = {"fingerprint.json", "manifest.json", "shards", "rankings"}  # rankings: head rankings kept for reuse
META_COLUMNS = ("id", "label", "attack", "source", "category", "split", "group")


class CacheMissingError(FileNotFoundError):
    """No finished cache where one was expected."""


class CacheMismatchError(ValueError):
    """A cache exists but was made by another model, prompt set or extraction setting."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ``["model.config_sha256", "prompts.sha256"]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in fingerprint_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def read_fingerprint(root: Path) -> dict[str, Any] | None:
    path = Path(root) / "fingerprint.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_folder(root: Path, fingerprint: dict[str, Any], rebuild: bool) -> list[str]:
    """Refuse ``root`` unless it is empty, cache-only, or a cache that may be reused or rebuilt.

    Reads only: every process can call it before any of them changes the folder. Returns the
    fingerprint keys that differ from the cache already there (empty if none or the same).
    """
    root = Path(root)
    if not root.exists():
        return []
    foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise CacheMismatchError(f"{root} holds files that are not an activation cache ({foreign[:5]}): "
                                 "choose an empty or cache-only folder for `cache_dir`")
    old = read_fingerprint(root)
    changed = fingerprint_diff(old, fingerprint) if old is not None and old != fingerprint else []
    if changed and not rebuild:
        raise CacheMismatchError(
            f"the activation cache at {root} was made with other settings (changed: {', '.join(changed)}). "
            "Point `cache_dir` at another folder, or set `on_mismatch: rebuild` to re-extract it.")
    return changed


def prepare_folder(root: Path, fingerprint: dict[str, Any], rebuild: bool) -> None:
    """Make ``root`` a cache for ``fingerprint``: keep finished shards of the same one, else refuse or clear.

    Only files that a cache owns are ever removed; a folder holding anything else is refused.
    """
    root = Path(root)
    changed = check_folder(root, fingerprint, rebuild)
    root.mkdir(parents=True, exist_ok=True)
    if changed:
        print(f"[sahs] rebuilding the activation cache at {root}: changed {', '.join(changed)}")
        for name in OWN_ENTRIES:
            target = root / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if read_fingerprint(root) is None:
        _write_atomic(root / "fingerprint.json", json.dumps(fingerprint, indent=2, sort_keys=True).encode())


class ShardWriter:
    """Buffers one rank's rows and writes them as whole shards.

    At most one shard's rows (plus the batch being added) are held in memory, already in the
    storage dtype, so host memory does not grow with the number of prompts.
    """

    def __init__(self, root: Path, layout: dict[str, Any], rank: int = 0, shard_size: int = 256,
                 dtype: torch.dtype = torch.float16):
        self.dir = Path(root) / "shards"
        self.layout = layout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.dtype = rank, shard_size, dtype
        taken = [int(p.stem.split("-")[1]) for p in self.dir.glob(f"r{rank:03d}-*.safetensors")]
        self.next_index = max(taken, default=-1) + 1
        self._ids: list[str] = []
        self._rows: list[torch.Tensor] = []

    def add(self, ids: Sequence[str], activations: torch.Tensor) -> None:
        """Queue rows ``[batch, layers, heads, head_dim]``; full shards go to disk at once."""
        self._ids.extend(ids)
        self._rows.extend(activations.detach().to("cpu", self.dtype).unbind(0))
        while len(self._ids) >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        if self._ids:
            self._write(len(self._ids))

    def _write(self, count: int) -> None:
        ids, self._ids = self._ids[:count], self._ids[count:]
        rows, self._rows = self._rows[:count], self._rows[count:]
        stem = f"r{self.rank:03d}-{self.next_index:05d}"
        self.next_index += 1
        tensor_path = self.dir / f"{stem}.safetensors"
        tmp = tensor_path.with_name(f".{tensor_path.name}.tmp")
        save_file({TENSOR: torch.stack(rows).contiguous()}, str(tmp))
        os.replace(tmp, tensor_path)
        sidecar = {"ids": ids, "sha256": _sha256(tensor_path), "layout": self.layout}
        _write_atomic(self.dir / f"{stem}.json", json.dumps(sidecar).encode())


def finished_shards(root: Path, verify: bool = True) -> dict[str, dict[str, Any]]:
    """Shard stem -> its sidecar (prompt ids, checksum, layout), for every shard that is whole.

    A shard with no sidecar (killed mid-write) or a wrong checksum (truncated, corrupt) is removed,
    so that its prompts are extracted again.
    """
    shard_dir = Path(root) / "shards"
    shards: dict[str, dict[str, Any]] = {}
    for tensor_path in sorted(shard_dir.glob("r*.safetensors")):
        sidecar_path = tensor_path.with_suffix(".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else None
        if sidecar is None or (verify and _sha256(tensor_path) != sidecar["sha256"]):
            print(f"[sahs] discarding unfinished or corrupt shard {tensor_path.name}; its prompts are redone")
            tensor_path.unlink()
            sidecar_path.unlink(missing_ok=True)
            continue
        shards[tensor_path.stem] = sidecar
    for tmp in shard_dir.glob(".*.tmp"):
        tmp.unlink()
    return shards


def recorded_ids(root: Path) -> set[str]:
    """Prompt ids of the shards that have a sidecar, read without checking or removing anything.

    Safe while other ranks write: a sidecar is renamed into place only after its shard.
    """
    ids: set[str] = set()
    for sidecar in (Path(root) / "shards").glob("r*.json"):
        if sidecar.with_suffix(".safetensors").exists():
            ids.update(json.loads(sidecar.read_text())["ids"])
    return ids


def write_manifest(root: Path, records: Iterable[dict[str, Any]]) -> None:
    """Tie all ranks' shards together; fails if a prompt has no row or has two."""
    where: dict[str, tuple[str, int]] = {}
    shards = finished_shards(root, verify=False)
    layouts = {json.dumps(sidecar["layout"], sort_keys=True) for sidecar in shards.values()}
    if len(layouts) != 1:
        raise RuntimeError(f"the shards in {root} disagree on their layout: {sorted(layouts)}")
    layout = shards[next(iter(shards))]["layout"]
    for stem, sidecar in shards.items():
        for row, prompt_id in enumerate(sidecar["ids"]):
            if prompt_id in where:
                raise RuntimeError(f"prompt {prompt_id!r} is in two shards ({where[prompt_id][0]}, {stem})")
            where[prompt_id] = (stem, row)
    rows = []
    for record in records:
        if record["id"] not in where:
            raise RuntimeError(f"prompt {record['id']!r} has no activations in {root}/shards")
        stem, row = where.pop(record["id"])
        meta = {c: record.get(c, "") for c in META_COLUMNS}
        meta["group"] = meta["group"] or meta["id"]  # a prompt of no named request is a request of its own
        rows.append({**meta, "shard": stem, "row": row})
    manifest = {"format_version": FORMAT_VERSION, "complete": True, "layout": layout, "rows": rows}
    _write_atomic(Path(root) / "manifest.json", json.dumps(manifest).encode())


def is_complete(root: Path, fingerprint: dict[str, Any]) -> bool:
    manifest = Path(root) / "manifest.json"
    return manifest.exists() and read_fingerprint(root) == fingerprint


class ActivationCache:
    """A finished cache, read lazily: ``read(heads)`` -> ``[prompts, len(heads), head_dim]``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.exists():
            raise CacheMissingError(
                f"no finished activation cache at {self.root}: add sahs.callbacks.ActivationExtraction to "
                "`trainer.callbacks` (it extracts before fitting) or run `sahs extract` with the same config")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(f"{self.root} has cache format {manifest.get('format_version')}, "
                                     f"this sahs reads {FORMAT_VERSION}: re-extract it")
        self.fingerprint = read_fingerprint(self.root)
        self.rows: list[dict[str, Any]] = manifest["rows"]
        self.layout: dict[str, Any] = manifest["layout"]
        self.layers: list[int] = self.layout["layers"]  # model layer index of each stored layer

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        """The manifest's per-prompt columns (caches written before request groups lack ``group``)."""
        return [name for name in self.rows[0] if name not in ("shard", "row")] if self.rows else []

    def column(self, name: str) -> list[Any]:
        return [row[name] for row in self.rows]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.column("label"), dtype=torch.long)

    def all_heads(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in self.layers for head in range(self.layout["num_heads"])]

    def read(self, heads: Sequence[tuple[int, int]] | None = None,
             dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Activations of ``heads`` (model ``(layer, head)`` pairs; all by default), in manifest order.

        ``dtype=None`` keeps the stored dtype (float16 from an extraction: half the memory of float32),
        as the head ranking and leave-one-attack-out read it; they convert a chunk of heads at a time.
        """
        heads = list(self.all_heads() if heads is None else heads)
        position = {layer: i for i, layer in enumerate(self.layers)}
        bad = [(l, h) for l, h in heads if l not in position or not 0 <= h < self.layout["num_heads"]]
        if bad:
            raise ValueError(f"heads {bad[:5]} are not in the cache at {self.root} "
                             f"(layers {self.layers}, {self.layout['num_heads']} heads a layer)")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for index, row in enumerate(self.rows):
            by_shard.setdefault(row["shard"], []).append((index, row["row"]))
        num_heads = self.layout["num_heads"]
        flat = [position[layer] * num_heads + head for layer, head in heads]
        select = None if flat == list(range(len(self.layers) * num_heads)) else torch.tensor(flat)
        out = None
        for stem, pairs in by_shard.items():
            targets, rows = zip(*pairs)
            with safe_open(str(self.root / "shards" / f"{stem}.safetensors"), framework="pt") as handle:
                # Memory-mapped: only the pages of the heads selected below are read from disk.
                stored = handle.get_tensor(TENSOR).flatten(1, 2)  # [shard_rows, layers * heads, head_dim]
                picked = stored if select is None else stored.index_select(1, select)
                if list(rows) != list(range(len(stored))):  # the manifest skips or reorders some rows
                    picked = picked[torch.tensor(rows)]
                if out is None:
                    shape = (len(self.rows), len(heads), self.layout["head_dim"])
                    out = torch.empty(shape, dtype=dtype or picked.dtype)
                out[torch.tensor(targets)] = picked.to(out.dtype)
        empty = (0, len(heads), self.layout["head_dim"])
        return out if out is not None else torch.empty(empty, dtype=dtype or torch.float32)
