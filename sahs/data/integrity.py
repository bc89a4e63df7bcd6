"""A full check of an activation cache folder, for ``sahs cache verify``: every file, every checksum.

Reuse checks less (the cheap checks when a cache is opened, each shard's checksum on its first read in a
process); this reads everything, also what only a later resume or repair relies on (the sidecars), and
reports what it finds rather than stopping at the first problem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sahs.data.cache import (
    CacheDamagedError,
    CacheMissingError,
    load_manifest,
    manifest_problems,
    repair_command,
)
from sahs.data.shards import SHARD_DIR, read_sidecar, shard_problems


@dataclass
class CacheReport:
    """What ``verify_cache`` found: problems make the cache unusable, notes do not."""

    root: Path
    finished: bool = False
    rows: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    affected_rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.finished and not self.problems

    def summary(self) -> str:
        if self.ok:
            return (f"{self.root}: {self.rows} rows in {self.shards} shards, every file and checksum as written "
                    f"({self.bytes / 1e6:.1f} MB checked in {self.seconds:.2f} s)")
        if not self.finished:
            return (f"{self.root} is not a finished cache (no manifest.json): finish it with `sahs extract "
                    f"--config <run config>` or `{repair_command(self.root)}`")
        rows = f", {self.affected_rows} of {self.rows} rows affected" if self.affected_rows else ""
        return (f"{self.root} is damaged ({len(self.problems)} problem{'s' * (len(self.problems) > 1)}{rows}): "
                f"run `{repair_command(self.root)}` to re-extract only what is affected")


def verify_cache(root: str | Path) -> CacheReport:
    """Check the manifest, every shard (size, header, sha256, listed prompts) and every sidecar."""
    start = time.perf_counter()
    report = CacheReport(Path(root))
    if not report.root.is_dir():
        raise CacheMissingError(f"no folder {report.root}: give the `data.cache_dir` of a run config")
    shard_dir = report.root / SHARD_DIR
    try:
        manifest = load_manifest(report.root)
    except (CacheMissingError, CacheDamagedError) as error:
        report.finished = isinstance(error, CacheDamagedError)  # a manifest is there, but damaged
        report.problems = error.problems if report.finished else ["no manifest.json"]
        finished = sorted(p.stem for p in shard_dir.glob("r*.safetensors") if read_sidecar(p.with_suffix(".json")))
        report.notes.append(f"{len(finished)} shards have a sidecar; a repair keeps those that pass their checksums")
        report.seconds = time.perf_counter() - start
        return report
    report.finished = True
    report.rows, report.shards = len(manifest["rows"]), len(manifest["shards"])
    report.bytes = sum(entry["bytes"] for entry in manifest["shards"].values())
    damaged = shard_problems(shard_dir, manifest["shards"], full=True)
    report.problems = manifest_problems(manifest) + [damaged[stem] for stem in sorted(damaged)]
    report.affected_rows = sum(1 for row in manifest["rows"] if row["shard"] in damaged)
    for stem, entry in sorted(manifest["shards"].items()):
        sidecar = read_sidecar(shard_dir / f"{stem}.json")
        if sidecar is None or sidecar["sha256"] != entry["sha256"]:
            report.notes.append(f"{stem}.json is missing or stale: a later resume would extract that shard again")
    for path in sorted(shard_dir.glob("r*.safetensors")):
        if path.stem not in manifest["shards"]:
            report.notes.append(f"{path.name} is not used by the manifest (rows repeated elsewhere); "
                                "a repair removes it if all its rows are")
    report.seconds = time.perf_counter() - start
    return report
