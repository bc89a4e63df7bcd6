"""Shard files of the activation cache: written whole or not at all, each one checkable on its own.

A shard ``shards/r{rank}-{index}.safetensors`` holds ``activations [rows, layers, heads, head_dim]``;
the metadata of its safetensors header lists its rows' prompt ids, so a shard names its own rows. Its
sidecar ``<stem>.json`` records the ids, the file's size and sha256, and the sha256 of its header. The
sidecar is written after the shard, so a shard without one is unfinished and its prompts are redone.

Every file is written to a temporary name and renamed, with the mode that the umask gives (0644 under
umask 022), the same for shards, sidecars, manifest and fingerprint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sahs.data.faults import kill_point
from sahs.errors import UserError

TENSOR = "activations"
SHARD_DIR = "shards"
# Every name a shard, its sidecar or their temporary files can have: all that a rebuild may delete in shards/.
SHARD_NAME = re.compile(r"\.?r\d{3,}-\d{5,}\.(?:safetensors|json)(?:\.\d+\.tmp)?")
MAX_HEADER = 100 << 20  # safetensors' own limit on the header's length
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


class ShardError(ValueError):
    """A shard file that is not the one its sidecar or the manifest recorded."""


class CacheWriteError(UserError, OSError):
    """A cache file could not be written (disk full, quota, read-only folder); what was finished is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


def write_file(path: Path, data: bytes | Sequence[bytes | memoryview], point: str | None = None) -> None:
    """Write ``data`` (bytes, or buffers written one after the other) to ``path`` through a temporary file
    and a rename: readers see all of it or none. ``point`` names the fault-test kill point, reached
    halfway through the last buffer.
    """
    *first, last = [data] if isinstance(data, (bytes, memoryview)) else data
    last = memoryview(last).cast("B")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as handle:  # open() creates with 0666 & ~umask, like every other file we write
            for buffer in first:
                handle.write(buffer)
            handle.write(last[: len(last) // 2])
            if point is not None:
                kill_point(point, handle)
            handle.write(last[len(last) // 2:])
        os.replace(tmp, path)
    except OSError as error:
        if error.errno not in _NO_ROOM:
            raise
        tmp.unlink(missing_ok=True)
        raise CacheWriteError(error.errno, f"cannot write {path}: {_NO_ROOM[error.errno]}. Free space (or fix "
                              f"the folder's permissions) and run the same command again: the finished shards in "
                              f"{path.parent} are kept and only the rest is extracted; or point `cache_dir` "
                              "elsewhere") from None


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def parse_header(prefix: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """The raw header (length field and JSON) at the start of a safetensors file, and its JSON."""
    if len(prefix) < 8:
        raise ShardError(f"{name} is shorter than a safetensors header")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER or len(prefix) < 8 + length:
        raise ShardError(f"{name} has a corrupt header (length field {length})")
    raw = prefix[:8 + length]
    try:
        header = json.loads(raw[8:])
    except ValueError as error:
        raise ShardError(f"{name} has a corrupt header ({error})") from None
    if not isinstance(header, dict):
        raise ShardError(f"{name} has a corrupt header (not a JSON object)")
    return raw, header


def read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if 0 < length <= MAX_HEADER:
            prefix += handle.read(length)
    return parse_header(prefix, path.name)


def header_ids(header: dict[str, Any]) -> list[str] | None:
    """The prompt ids that a shard's header lists, or None if it lists none."""
    try:
        ids = json.loads(header["__metadata__"]["ids"])
    except (KeyError, TypeError, ValueError):
        return None
    return ids if isinstance(ids, list) else None


def check_shard(path: Path, record: dict[str, Any], ids: Sequence[str] | None = None) -> None:
    """Cheap checks, no full read: the file is there, with the recorded size and header, listing ``ids``.

    ``record`` is a sidecar or a manifest entry (``bytes``, ``header_sha256``, ``sha256``).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path.name} is missing") from None
    if size != record["bytes"]:
        raise ShardError(f"{path.name} has {size} bytes, {record['bytes']} were written")
    raw, header = read_header(path)
    if hashlib.sha256(raw).hexdigest() != record["header_sha256"]:
        raise ShardError(f"{path.name} has a header other than the one written (corrupt)")
    if ids is not None and header_ids(header) != list(ids):
        raise ShardError(f"{path.name} lists other prompts than its record")


# Shards whose full checksum matched in this process, keyed by what would change if the file did.
_verified: dict[str, tuple[int, int, int, int, str]] = {}


def _signature(path: Path, sha256: str) -> tuple[int, int, int, int, str]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256


def forget_verified() -> None:
    """Make the next read of every shard check its checksum again (benchmarks and tests)."""
    _verified.clear()


def verify_checksum(path: Path, sha256: str) -> None:
    """The full sha256 of the file, once per process: a file already verified and unchanged is skipped."""
    key = str(path.resolve())
    if _verified.get(key) == _signature(path, sha256):
        return
    if sha256_file(path) != sha256:
        raise ShardError(f"{path.name} does not match its checksum (corrupt data)")
    _verified[key] = _signature(path, sha256)


def shard_problems(shard_dir: Path, records: dict[str, dict[str, Any]], full: bool) -> dict[str, str]:
    """Stem -> what is wrong with it, for the shards of ``records`` (sidecars or manifest entries).

    Cheap checks on every shard; with ``full`` also the checksums, hashed on several threads (sha256
    and file reads release the GIL), each file once per process.
    """
    def check(stem: str) -> str | None:
        path = shard_dir / f"{stem}.safetensors"
        try:
            check_shard(path, records[stem], records[stem].get("ids"))
            if full:
                verify_checksum(path, records[stem]["sha256"])
        except ShardError as problem:
            return str(problem)
        except OSError as error:
            return f"{path.name} cannot be read ({error.strerror or error})"
        return None

    stems = sorted(records)
    if not stems:
        return {}
    with ThreadPoolExecutor(min(len(stems), len(os.sched_getaffinity(0)), 8)) as pool:
        found = dict(zip(stems, pool.map(check, stems)))
    return {stem: problem for stem, problem in found.items() if problem is not None}


def encode_shard(ids: Sequence[str], rows: torch.Tensor) -> tuple[list[bytes | memoryview], dict[str, Any]]:
    """A safetensors file as ``[header, data]``, the data a view of ``rows`` (no copy), and its sidecar.

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header (padded with
    spaces so the data starts 8-byte aligned), then the tensor's bytes.
    """
    rows = rows.contiguous()
    data = memoryview(rows.view(torch.uint8).numpy()).cast("B")  # byte view: any dtype, little-endian hosts
    header = {TENSOR: {"dtype": SAFETENSORS_DTYPES[rows.dtype], "shape": list(rows.shape),
                       "data_offsets": [0, len(data)]},
              "__metadata__": {"ids": json.dumps(list(ids))}}
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    raw = len(body).to_bytes(8, "little") + body
    digest = hashlib.sha256(raw)
    digest.update(data)
    sidecar = {"ids": list(ids), "bytes": len(raw) + len(data), "sha256": digest.hexdigest(),
               "header_sha256": hashlib.sha256(raw).hexdigest()}
    return [raw, data], sidecar


class ShardWriter:
    """Buffers one rank's rows and writes them as whole shards.

    At most one shard's rows (plus the batch being added) are held in memory, already in the
    storage dtype, so host memory does not grow with the number of prompts.
    """

    def __init__(self, root: Path, layout: dict[str, Any], rank: int = 0, shard_size: int = 256,
                 dtype: torch.dtype = torch.float16):
        self.dir = Path(root) / SHARD_DIR
        self.layout = layout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.dtype = rank, shard_size, dtype
        taken = [int(p.stem.split("-")[1]) for p in self.dir.glob(f"r{rank:03d}-*.safetensors")
                 if SHARD_NAME.fullmatch(p.name)]
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
        # The checksum is taken from the bytes written, not read back: what another process might
        # have put under the same name can never be vouched for by this sidecar.
        parts, sidecar = encode_shard(ids, torch.stack(rows))
        write_file(self.dir / f"{stem}.safetensors", parts, point="shard_write")
        kill_point("shard_renamed")
        write_file(self.dir / f"{stem}.json", json.dumps({**sidecar, "layout": self.layout}).encode())
        kill_point("shard_written")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A shard's sidecar, or None if it is missing or not a whole one (then the shard is redone)."""
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    needed = {"ids", "bytes", "sha256", "header_sha256", "layout"}
    return sidecar if isinstance(sidecar, dict) and needed <= set(sidecar) else None


def finished_shards(root: Path, verify: bool = True) -> dict[str, dict[str, Any]]:
    """Shard stem -> its sidecar, for every shard that is whole; call it only while holding the lock.

    A shard with no valid sidecar (killed mid-write), another size or header, or (with ``verify``) a
    wrong checksum is removed, so that its prompts are extracted again. Leftover temporary files go too.
    """
    shard_dir = Path(root) / SHARD_DIR
    shards: dict[str, dict[str, Any]] = {}
    for tensor_path in sorted(p for p in shard_dir.glob("r*.safetensors") if SHARD_NAME.fullmatch(p.name)):
        sidecar_path = tensor_path.with_suffix(".json")
        sidecar = read_sidecar(sidecar_path)
        try:
            if sidecar is None:
                raise ShardError(f"{tensor_path.name} has no sidecar (unfinished)")
            check_shard(tensor_path, sidecar, sidecar["ids"])
            if verify:
                verify_checksum(tensor_path, sidecar["sha256"])
        except ShardError as problem:
            print(f"[sahs] discarding a shard: {problem}; its prompts are redone")
            tensor_path.unlink()
            sidecar_path.unlink(missing_ok=True)
            continue
        shards[tensor_path.stem] = sidecar
    for orphan in shard_dir.glob("r*.json"):  # a sidecar whose shard is gone
        if SHARD_NAME.fullmatch(orphan.name) and orphan.stem not in shards and not orphan.with_suffix(".safetensors").exists():
            orphan.unlink()
    for tmp in shard_dir.glob(".*.tmp"):
        if SHARD_NAME.fullmatch(tmp.name):
            tmp.unlink()
    return shards


def drop_duplicate_shards(root: Path, shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Remove shards whose every prompt is already in an earlier shard (two extractions into one folder).

    A prompt in two shards that both keep other prompts stays in both; the manifest uses the first.
    """
    seen: set[str] = set()
    kept: dict[str, dict[str, Any]] = {}
    for stem in sorted(shards):
        ids = shards[stem]["ids"]
        if ids and all(pid in seen for pid in ids):
            print(f"[sahs] removing shard {stem}: each of its {len(ids)} prompts is also in an earlier shard")
            for suffix in (".safetensors", ".json"):
                (Path(root) / SHARD_DIR / f"{stem}{suffix}").unlink(missing_ok=True)
            continue
        seen.update(ids)
        kept[stem] = shards[stem]
    return kept


def recorded_ids(root: Path) -> set[str]:
    """Prompt ids of the shards that have a sidecar, read without checking or removing anything.

    Safe while other ranks write: a sidecar is renamed into place only after its shard.
    """
    ids: set[str] = set()
    for path in (Path(root) / SHARD_DIR).glob("r*.json"):
        sidecar = read_sidecar(path)
        if sidecar is not None and path.with_suffix(".safetensors").exists():
            ids.update(sidecar["ids"])
    return ids
