"""What a finished activation cache says about itself: its manifest, its fingerprint, and their checks.

``fingerprint.json`` says what made the activations (model, prompt set, extraction settings) and, once the
manifest is written, pins the manifest's rows by a digest (``rows``); ``manifest.json`` lists every prompt
and shard and records the sha256 of ``fingerprint.json``, under its own checksum. So each vouches for the
other, and a missing, replaced or relabelled part is refused as damage (``CacheDamagedError``, naming
the file and field) when the cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sahs.data.faults import kill_point
from sahs.data.shards import drop_duplicate_shards, finished_shards, write_file
from sahs.errors import UserError

FORMAT_VERSION = 3  # 3: fingerprint.json pins the manifest's rows, and the manifest always records fingerprint.json
META_COLUMNS = ("id", "label", "attack", "source", "category", "split", "group")
PINNED_COLUMNS = ("id", "label", "attack", "group")  # what fingerprint.json's rows digest covers
ROW_KEYS = {"id", "label", "attack", "shard", "row"}  # what every manifest row must have
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
    table = [(row["id"], row["label"], row["attack"], row.get("group") or row["id"]) for row in rows]
    return hashlib.sha256(json.dumps(table, separators=(",", ":"), check_circular=False).encode()).hexdigest()


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
    try:
        digests.append(rows_digest(manifest["rows"]))
    except (KeyError, TypeError, ValueError):  # rows not as sahs writes them: nothing to vouch with
        pass
    for digest in digests:
        candidate = with_rows(fingerprint, digest)
        if _sha256(fingerprint_bytes(candidate)) == manifest["fingerprint_sha256"]:
            return candidate
    return None



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
        if not isinstance(row, dict) or not row.keys() >= ROW_KEYS:
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
