"""The activation cache: extract once, train many times.

Layout of a cache folder::

    fingerprint.json            what produced it (model, prompt set, extraction settings), and a digest
                                of the manifest's rows (ids, labels, attacks, groups)
    shards/r000-00000.safetensors   "activations" [rows, layers, heads, head_dim], one rank's rows
    shards/r000-00000.json          sidecar: prompt ids, size and sha256 of the shard and its header;
                                    written last, so a shard without one is unfinished and gets redone
    manifest.json               every prompt's id, label, attack, source, category, split, shard, row;
                                every shard's size and checksums; fingerprint.json's sha256; its own
                                checksum. Written last (``sahs.data.manifest``).
    .lock                       held (flock) by the one extraction that may write here

A finished cache is checked before use: cheaply when opened (every shard there, with the size and
header recorded), fully on the first read in a process (each shard's sha256, lazily per shard). A damaged
cache is refused with the shard named and the command that re-extracts only its rows.
Reads are memory-mapped (safetensors) and touch only the pages of the heads asked for.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sahs.data.manifest import (  # noqa: F401  (re-exported: the cache's own records)
    FORMAT_VERSION,
    META_COLUMNS,
    PINNED_COLUMNS,
    ROWS_KEY,
    CacheDamagedError,
    CacheMismatchError,
    CacheMissingError,
    _digest,
    _intact_manifest,
    cache_identity,
    fingerprint_bytes,
    fingerprint_diff,
    load_manifest,
    manifest_problems,
    read_fingerprint,
    repair_command,
    rows_digest,
    vouched_fingerprint,
    with_rows,
    write_manifest,
)
from sahs.data.shards import (  # noqa: F401  (re-exported: the cache's writing side)
    SHARD_DIR,
    SHARD_NAME,
    TENSOR,
    ShardWriter,
    drop_duplicate_shards,
    finished_shards,
    recorded_ids,
    shard_problems,
    write_file,
)

OWN_ENTRIES = {"fingerprint.json", "manifest.json", SHARD_DIR, "rankings"}  # rankings: head rankings kept for reuse


def _holds_activations(root: Path) -> bool:
    return (root / "manifest.json").exists() or any(
        SHARD_NAME.fullmatch(path.name) for path in (root / SHARD_DIR).glob("r*.safetensors"))


def check_folder(root: Path, fingerprint: dict[str, Any], rebuild: bool) -> list[str]:
    """Refuse ``root`` unless it is empty, cache-only, or a cache that may be reused or rebuilt.

    Reads only: every process can call it before any of them changes the folder. Returns the
    fingerprint keys that differ from the cache already there (empty if none or the same). Activations
    whose fingerprint.json is missing or replaced count as another fingerprint's, unless the manifest
    records exactly this one.
    """
    root = Path(root)
    if not root.exists():
        return []
    foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise CacheMismatchError(f"{root} holds files that are not an activation cache ({foreign[:5]}): "
                                 "choose an empty or cache-only folder for `cache_dir`")
    if vouched_fingerprint(root, fingerprint) is not None:  # fingerprint.json is, or can be restored to, this one
        return []
    try:
        old = read_fingerprint(root)
    except CacheDamagedError:
        changed = ["fingerprint.json (unreadable)"]
    else:
        if old is None:
            changed = ["fingerprint.json (missing)"] if _holds_activations(root) else []
        else:
            changed = fingerprint_diff(cache_identity(old), cache_identity(fingerprint))
            if not changed and _intact_manifest(root) is not None:
                changed = ["fingerprint.json (not the one the manifest was written with)"]
    if changed and not rebuild:
        if changed[0].startswith("fingerprint.json"):
            raise CacheMismatchError(
                f"the activation cache at {root} has {changed[0]} and its manifest does not record this "
                "config's fingerprint, so its activations may be another model's or prompt set's: point "
                "`cache_dir` at another folder, or set `on_mismatch: rebuild` to re-extract it")
        raise CacheMismatchError(
            f"the activation cache at {root} was made with other settings (changed: {', '.join(changed)}). "
            "Point `cache_dir` at another folder, or set `on_mismatch: rebuild` to re-extract it.")
    return changed


def prepare_folder(root: Path, fingerprint: dict[str, Any], rebuild: bool) -> None:
    """Make ``root`` a cache for ``fingerprint``: keep finished shards of the same one, else refuse or clear.

    Only files that a cache owns are ever removed; a folder holding anything else is refused. A missing
    or replaced fingerprint.json is restored only to what the manifest records.
    """
    root = Path(root)
    changed = check_folder(root, fingerprint, rebuild)
    root.mkdir(parents=True, exist_ok=True)
    if changed:
        print(f"[sahs] rebuilding the activation cache at {root}: changed {', '.join(changed)}")
        remove_owned(root)
    path = root / "fingerprint.json"
    restored = None if changed else vouched_fingerprint(root, fingerprint)
    if restored is not None:
        if not path.exists() or path.read_bytes() != fingerprint_bytes(restored):
            write_file(path, fingerprint_bytes(restored))
        return
    try:
        current = read_fingerprint(root)
    except CacheDamagedError:
        current = None
    if current is None or cache_identity(current) != cache_identity(fingerprint):
        write_file(path, fingerprint_bytes(cache_identity(fingerprint)))


def is_complete(root: Path, fingerprint: dict[str, Any]) -> bool:
    """A finished cache made for ``fingerprint`` (not yet checked for damage: a missing or damaged
    fingerprint.json counts if the manifest records this fingerprint, so that opening the cache reports it)."""
    if not (Path(root) / "manifest.json").exists():
        return False
    try:
        stored = read_fingerprint(root)
    except CacheDamagedError:
        stored = None
    if stored is not None and cache_identity(stored) == cache_identity(fingerprint):
        return True
    return vouched_fingerprint(Path(root), fingerprint) is not None


def remove_owned(root: Path) -> None:
    """Delete what a cache owns in ``root`` and nothing else: its fingerprint, manifest, rankings, and in
    ``shards/`` only files named as shards, sidecars or their temporary files (others are left, and said)."""
    root = Path(root)
    for name in ("fingerprint.json", "manifest.json"):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / "rankings", ignore_errors=True)
    shard_dir = root / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for path in shard_dir.iterdir():
        if path.is_file() and SHARD_NAME.fullmatch(path.name):
            path.unlink()
    left = sorted(p.name for p in shard_dir.iterdir())
    if left:
        print(f"[sahs] left {len(left)} files in {shard_dir} that are not shards: {left[:5]}")
    else:
        shard_dir.rmdir()


class ActivationCache:
    """A finished cache, read lazily: ``read(heads)`` -> ``[prompts, len(heads), head_dim]``.

    Opening it runs the cheap checks on every shard; ``checksums`` (the default) adds each shard's full
    sha256 the first time this process reads it. Damage raises ``CacheDamagedError``, naming the shard.
    """

    def __init__(self, root: str | os.PathLike[str], checksums: bool = True):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        self.fingerprint = cache_identity(read_fingerprint(self.root))  # model, prompts, extraction settings
        self.rows: list[dict[str, Any]] = manifest["rows"]
        self.layout: dict[str, Any] = manifest["layout"]
        self.layers: list[int] = self.layout["layers"]  # model layer index of each stored layer
        self.shards: dict[str, dict[str, Any]] = manifest["shards"]
        self.checksums = checksums
        self._raise_problems(manifest_problems(manifest) or shard_problems(self.shard_dir, self.shards, full=False))

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def _raise_problems(self, problems: dict[str, str] | list[str]) -> None:
        if not problems:
            return
        if isinstance(problems, list):
            raise CacheDamagedError(self.root, problems)
        rows = sum(1 for row in self.rows if row["shard"] in problems)
        raise CacheDamagedError(self.root, [problems[stem] for stem in sorted(problems)], rows)

    def verify(self, stems: Iterable[str] | None = None) -> None:
        """Check the full checksums of ``stems`` (all shards by default); each file once per process."""
        wanted = {stem: self.shards[stem] for stem in (self.shards if stems is None else stems)}
        self._raise_problems(shard_problems(self.shard_dir, wanted, full=True))

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
        if not heads:
            raise ValueError("no heads to read: name at least one (layer, head) pair")
        position = {layer: i for i, layer in enumerate(self.layers)}
        bad = [(l, h) for l, h in heads if l not in position or not 0 <= h < self.layout["num_heads"]]
        if bad:
            raise ValueError(f"heads {bad[:5]} are not in the cache at {self.root} "
                             f"(layers {self.layers}, {self.layout['num_heads']} heads a layer)")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for index, row in enumerate(self.rows):
            by_shard.setdefault(row["shard"], []).append((index, row["row"]))
        if self.checksums:
            self.verify(by_shard)
        num_heads = self.layout["num_heads"]
        flat = [position[layer] * num_heads + head for layer, head in heads]
        select = None if flat == list(range(len(self.layers) * num_heads)) else torch.tensor(flat)
        out = None
        for stem, pairs in by_shard.items():
            targets, rows = zip(*pairs)
            path = self.shard_dir / f"{stem}.safetensors"
            try:
                with safe_open(str(path), framework="pt") as handle:
                    # Memory-mapped: only the pages of the heads selected below are read from disk.
                    stored = handle.get_tensor(TENSOR).flatten(1, 2)  # [shard_rows, layers * heads, head_dim]
                    picked = stored if select is None else stored.index_select(1, select)
                    if list(rows) != list(range(len(stored))):  # the manifest skips or reorders some rows
                        picked = picked[torch.tensor(rows)]
                    if out is None:
                        shape = (len(self.rows), len(heads), self.layout["head_dim"])
                        out = torch.empty(shape, dtype=dtype or picked.dtype)
                    out[torch.tensor(targets)] = picked.to(out.dtype)
            except (SafetensorError, OSError) as error:
                raise CacheDamagedError(self.root, [f"{path.name} cannot be read ({error})"],
                                        len(pairs)) from None
        empty = (0, len(heads), self.layout["head_dim"])
        return out if out is not None else torch.empty(empty, dtype=dtype or torch.float32)
