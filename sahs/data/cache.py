"""The activation cache: extract once, train many times.

Layout of a cache folder::

    fingerprint.json            what produced it (model, prompt set, extraction settings)
    shards/r000-00000.safetensors   "activations" [rows, layers, heads, head_dim], one rank's rows
    shards/r000-00000.json          sidecar: prompt ids, size and sha256 of the shard and its header;
                                    written last, so a shard without one is unfinished and gets redone
    manifest.json               every prompt's id, label, attack, source, category, split, shard, row;
                                every shard's size and checksums; its own checksum. Written last.
    .lock                       held (flock) by the one extraction that may write here

A finished cache is checked before use: cheaply when opened (every shard there, with the size and
header recorded), fully on the first read in a process (each shard's sha256, lazily per shard). A damaged
cache is refused with the shard named and the command that re-extracts only its rows.
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
from safetensors import SafetensorError, safe_open

from sahs.data.faults import kill_point
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
from sahs.errors import UserError

FORMAT_VERSION = 3  # 3: fingerprint.json pins the manifest's rows, and the manifest always records fingerprint.json
OWN_ENTRIES = {"fingerprint.json", "manifest.json", SHARD_DIR, "rankings"}  # rankings: head rankings kept for reuse
META_COLUMNS = ("id", "label", "attack", "source", "category", "split", "group")
PINNED_COLUMNS = ("id", "label", "attack", "group")  # what fingerprint.json's rows digest covers
ROWS_KEY = "rows"  # fingerprint.json's digest of the manifest's rows: written with the manifest, not part of identity


class CacheMissingError(UserError, FileNotFoundError):
    """No finished cache where one was expected."""


class CacheMismatchError(UserError, ValueError):
    """A cache exists but was made by another model, prompt set or extraction setting."""


class CacheDamagedError(UserError, RuntimeError):
    """A finished cache whose files are not the ones written: missing, truncated or corrupt."""

    def __init__(self, root: Path, problems: Sequence[str], rows: int | None = None):
        self.root, self.problems, self.rows = Path(root), list(problems), rows
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        affected = f" the {rows} rows affected" if rows else " what is affected"
        super().__init__(f"the activation cache at {root} is damaged: {problems[0]}{more}. "
                         f"Run `{repair_command(root)}` to re-extract{affected}")


def repair_command(root: str | os.PathLike[str]) -> str:
    return f"sahs cache repair {root} --config <run config>"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ``["model.config_sha256", "prompts.sha256"]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in fingerprint_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def read_fingerprint(root: Path) -> dict[str, Any] | None:
    """``fingerprint.json`` as stored (with its ``rows`` digest), or None if there is none; not yet checked
    against the manifest (``load_manifest`` does that)."""
    path = Path(root) / "fingerprint.json"
    if not path.exists():
        return None
    try:
        fingerprint = json.loads(path.read_text())
    except ValueError:
        raise CacheDamagedError(root, ["fingerprint.json is not valid JSON"]) from None
    if not isinstance(fingerprint, dict):
        raise CacheDamagedError(root, ["fingerprint.json is not a JSON object"])
    return fingerprint


def fingerprint_bytes(fingerprint: dict[str, Any]) -> bytes:
    """``fingerprint.json`` as written; the manifest records its sha256."""
    return json.dumps(fingerprint, indent=2, sort_keys=True).encode()


def rows_digest(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 of the manifest's ``PINNED_COLUMNS``, row by row in manifest order (a row's group defaults to its id)."""
    table = [[row.get("id"), row.get("label"), row.get("attack"), row.get("group") or row.get("id")] for row in rows]
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()


def cache_identity(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """What made the activations (model, prompt set, extraction settings): the fingerprint without its rows digest."""
    return {key: value for key, value in (fingerprint or {}).items() if key != ROWS_KEY}


def with_rows(fingerprint: dict[str, Any], digest: Any) -> dict[str, Any]:
    """The stored form of ``fingerprint``: its identity plus the digest of the rows that the manifest lists."""
    return {**cache_identity(fingerprint), ROWS_KEY: {"sha256": digest, "columns": list(PINNED_COLUMNS)}}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _intact_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest if it parses and matches its own checksum, else None (no checks of its content)."""
    try:
        manifest = json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return manifest if manifest.get("checksum") == _digest(body) else None


def vouched_fingerprint(root: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The stored fingerprint with the identity of ``fingerprint`` whose sha256 the manifest records, or None.

    This is what ``fingerprint.json`` must hold for the manifest's rows to be this config's; it is how a
    missing or replaced ``fingerprint.json`` is restored, and only then.
    """
    manifest = _intact_manifest(root)
    if manifest is None or not isinstance(manifest.get("fingerprint_sha256"), str):
        return None
    digests = []
    try:
        stored = read_fingerprint(root)
    except CacheDamagedError:
        stored = None
    if stored is not None and isinstance(stored.get(ROWS_KEY), dict):
        digests.append(stored[ROWS_KEY].get("sha256"))
    if isinstance(manifest.get("rows"), list) and all(isinstance(row, dict) for row in manifest["rows"]):
        digests.append(rows_digest(manifest["rows"]))
    for digest in digests:
        candidate = with_rows(fingerprint, digest)
        if _sha256(fingerprint_bytes(candidate)) == manifest["fingerprint_sha256"]:
            return candidate
    return None


def _holds_activations(root: Path) -> bool:
    return (root / "manifest.json").exists() or any((root / SHARD_DIR).glob("r*.safetensors"))


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


def write_manifest(root: Path, records: Iterable[dict[str, Any]]) -> None:
    """Tie all ranks' shards together; fails if a prompt has no row. Call it while holding the lock.

    A prompt in two shards (two extractions into one folder, before locks) is taken from the first.
    fingerprint.json gains the digest of the rows, and the manifest records the sha256 of fingerprint.json.
    """
    root = Path(root)
    stored = read_fingerprint(root)
    if stored is None:
        raise RuntimeError(f"{root} has no fingerprint.json: prepare_folder writes it before any shard")
    shards = drop_duplicate_shards(root, finished_shards(root, verify=False))
    if not shards:
        raise RuntimeError(f"{root}/shards holds no finished shard: nothing was extracted")
    layouts = {json.dumps(sidecar["layout"], sort_keys=True) for sidecar in shards.values()}
    if len(layouts) != 1:
        raise RuntimeError(f"the shards in {root} disagree on their layout: {sorted(layouts)}; "
                           f"`{repair_command(root)}` redoes them")
    where: dict[str, tuple[str, int]] = {}
    for stem, sidecar in shards.items():  # sorted by stem: the first copy of a prompt wins
        for row, prompt_id in enumerate(sidecar["ids"]):
            where.setdefault(prompt_id, (stem, row))
    rows = []
    for record in records:
        if record["id"] not in where:
            raise RuntimeError(f"prompt {record['id']!r} has no activations in {root}/shards")
        stem, row = where.pop(record["id"])
        meta = {c: record.get(c, "") for c in META_COLUMNS}
        meta["group"] = meta["group"] or meta["id"]  # a prompt of no named request is a request of its own
        rows.append({**meta, "shard": stem, "row": row})
    used = {row["shard"] for row in rows}
    table = {stem: {key: sidecar[key] for key in ("ids", "bytes", "sha256", "header_sha256")}
             for stem, sidecar in shards.items() if stem in used}
    fingerprint = fingerprint_bytes(with_rows(stored, rows_digest(rows)))
    if (root / "fingerprint.json").read_bytes() != fingerprint:
        write_file(root / "fingerprint.json", fingerprint)
    manifest = {"format_version": FORMAT_VERSION, "complete": True, "layout": json.loads(layouts.pop()),
                "fingerprint_sha256": _sha256(fingerprint), "shards": table, "rows": rows}
    manifest["checksum"] = _digest(manifest)
    kill_point("before_manifest")
    write_file(root / "manifest.json", json.dumps(manifest).encode(), point="manifest_write")


def _manifest_shape_problem(manifest: dict[str, Any]) -> str | None:
    """The first field of a manifest that is not what sahs writes (a hand edit), or None."""
    layout, shards, rows = manifest.get("layout"), manifest.get("shards"), manifest.get("rows")
    if not isinstance(layout, dict) or not all(key in layout for key in ("layers", "num_heads", "head_dim")):
        return "manifest.json field layout lacks layers, num_heads or head_dim"
    if not isinstance(shards, dict) or not all(
            isinstance(entry, dict) and {"ids", "bytes", "sha256", "header_sha256"} <= set(entry)
            for entry in shards.values()):
        return "manifest.json field shards is not a table of ids, bytes, sha256 and header_sha256"
    if not isinstance(rows, list):
        return "manifest.json field rows is not a list"
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not {"id", "label", "attack", "shard", "row"} <= set(row):
            return f"manifest.json rows[{index}] lacks one of id, label, attack, shard, row"
    return None


def load_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a finished cache, after checking its checksum, its fields, that fingerprint.json is
    the one it was written with, and that its rows are the ones fingerprint.json pins."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.exists():
        raise CacheMissingError(
            f"no finished activation cache at {root}: add sahs.callbacks.ActivationExtraction to "
            "`trainer.callbacks` (it extracts before fitting) or run `sahs extract` with the same config")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise CacheDamagedError(root, ["manifest.json is not valid JSON"]) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CacheMismatchError(f"{root} has cache format {version}, this sahs reads {FORMAT_VERSION}: "
                                 "re-extract it (`on_mismatch: rebuild`, or an empty `cache_dir`)")
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    if manifest.get("checksum") != _digest(body):
        raise CacheDamagedError(root, ["manifest.json does not match its checksum (corrupt)"])
    if problem := _manifest_shape_problem(manifest):
        raise CacheDamagedError(root, [problem])
    fingerprint = root / "fingerprint.json"
    if not fingerprint.exists():
        raise CacheDamagedError(root, ["fingerprint.json is missing (the manifest records its sha256, so the "
                                       "run config that made the cache can restore it)"])
    if _sha256(fingerprint.read_bytes()) != manifest.get("fingerprint_sha256"):
        raise CacheDamagedError(root, ["fingerprint.json is not the one the manifest was written with"])
    pinned = (read_fingerprint(root) or {}).get(ROWS_KEY)
    if not isinstance(pinned, dict) or pinned.get("sha256") != rows_digest(manifest["rows"]):
        raise CacheDamagedError(root, ["manifest.json rows (ids, labels, attacks, groups) are not the ones "
                                       "fingerprint.json field rows.sha256 pins (edited labels?)"])
    return manifest


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Rows that point outside their shard or at another prompt, and prompts listed twice."""
    problems, seen = [], set()
    for row in manifest["rows"]:
        shard = manifest["shards"].get(row["shard"])
        if shard is None or not 0 <= row["row"] < len(shard["ids"]) or shard["ids"][row["row"]] != row["id"]:
            problems.append(f"manifest.json: prompt {row['id']!r} points at no row of its own")
        if row["id"] in seen:
            problems.append(f"manifest.json: prompt {row['id']!r} is listed twice")
        seen.add(row["id"])
    return problems


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
