"""The one schema every prompt set follows, its content hash, and the ``PromptSource`` interface.

A prompt set is a ``datasets.Dataset`` with the columns of ``FEATURES``. ``group`` names the
underlying request: the same question rendered by several attack families (MM-SafetyBench's SD,
typography and text forms) shares one group, so that splits can keep it on one side. Sources are configured
from YAML (``class_path`` / ``init_args``), so each one is a class whose typed ``__init__`` is its
config schema and whose ``load()`` returns such a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
from PIL import Image, UnidentifiedImageError

from sahs.errors import UserError
from sahs.prompts.identity import Unstated, describe, file_digest, identity_digest

COLUMNS = ("id", "text", "image", "label", "attack", "source", "category", "group")
TEXT_COLUMNS = ("id", "text", "label", "attack", "source", "category", "group")
LABEL_NAMES = ("benign", "malicious")

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
        "attack": datasets.Value("string"),
        "source": datasets.Value("string"),
        "category": datasets.Value("string"),
        "group": datasets.Value("string"),  # the underlying request; the id when a prompt is a request of its own
    }
)

class BadImageError(UserError, ValueError):
    """A prompt whose stored image cannot be decoded."""


class EmptyPromptSetError(UserError, ValueError):
    """A prompt set with no prompts where prompts are needed."""


class SavedSetNotFoundError(UserError, FileNotFoundError):
    """A ``SavedPrompts`` path that holds no saved prompt set."""


PROVENANCE_FILE = "provenance.jsonl"  # per-row licence and origin, beside a saved set

# Bump when the hashed byte layout changes, so old cache fingerprints stop matching.
_HASH_VERSION = b"sahs-prompt-set/v2\n"  # v2: the group column is hashed


@dataclass(frozen=True)
class Provenance:
    """Where one row's content came from and under which licence it is used."""

    licence: str
    origin: str


def _check_record(record: Mapping[str, Any], position: int) -> str:
    """Validate one record against the schema and return its id (errors name the id)."""
    rid = record.get("id")
    name = repr(rid) if isinstance(rid, str) and rid else f"at position {position}"
    keys = set(record) | {"group"}  # optional: a prompt without one is a request of its own
    if keys != set(COLUMNS):
        missing, extra = sorted(set(COLUMNS) - keys), sorted(keys - set(COLUMNS))
        raise ValueError(f"prompt {name}: columns must be {list(COLUMNS)}; missing {missing}, unexpected {extra}")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"prompt {name}: id must be a non-empty string, got {rid!r}")
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise ValueError(f"prompt {name}: text must be a non-empty string")
    label = record["label"]
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"prompt {name}: label must be 0 (benign) or 1 (malicious), got {label!r}")
    for column in ("attack", "source", "category"):
        if not isinstance(record[column], str) or not record[column]:
            raise ValueError(f"prompt {name}: {column} must be a non-empty string, got {record[column]!r}")
    group = record.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"prompt {name}: group must be None (a request of its own) or a non-empty string, "
                         f"got {group!r}")
    image = record["image"]
    if image is not None and not isinstance(image, (Image.Image, dict)):
        raise ValueError(f"prompt {name}: image must be None, a PIL image or a {{path, bytes}} dict")
    return rid


def make_dataset(records: list[dict[str, Any]]) -> datasets.Dataset:
    """Build a prompt set from row dicts, after checking ids, labels and texts; a missing group is the id."""
    seen: set[str] = set()
    for position, record in enumerate(records):
        rid = _check_record(record, position)
        if rid in seen:
            raise ValueError(f"prompt id {rid!r} occurs more than once; ids must be unique")
        seen.add(rid)
    if not records:
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=FEATURES)
    rows = [{**{c: r.get(c) for c in COLUMNS}, "group": r.get("group") or r["id"]} for r in records]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def check_schema(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """``ds`` if it has exactly the schema's columns and types, else raise; ``where`` names it in the error.

    A set saved before the ``group`` column existed gets one: every prompt a request of its own.
    """
    if "group" not in ds.column_names and ds.features == datasets.Features(
            {c: f for c, f in FEATURES.items() if c != "group"}):
        ds = ds.add_column("group", ds["id"], feature=FEATURES["group"])
    if ds.features != FEATURES:
        raise ValueError(
            f"{where} does not follow the prompt-set schema: expected columns {dict(FEATURES)}, "
            f"found {dict(ds.features)}"
        )
    return ds


def open_image(value: Mapping[str, Any]) -> Image.Image:
    """Open an image stored as a datasets ``{bytes, path}`` struct (bytes win when present)."""
    if value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if value.get("path"):
        return Image.open(value["path"])
    raise ValueError("image entry has neither bytes nor path")


def _bad_image(prompt_id: str, error: Exception) -> BadImageError:
    reason = ("not an image file that PIL can read" if isinstance(error, UnidentifiedImageError)
              else f"{type(error).__name__}: {error}")
    return BadImageError(f"prompt {prompt_id!r}: its image cannot be read ({reason}); "
                         "fix or drop that row of the prompt set")


def read_image(prompt_id: str, value: Mapping[str, Any] | None) -> Image.Image | None:
    """A stored image decoded as ``datasets`` decodes it; an unreadable one is reported with its prompt id."""
    if value is None:
        return None
    try:
        image = FEATURES["image"].decode_example(dict(value))
    except Exception as error:  # PIL raises several types for truncated or foreign bytes
        raise _bad_image(prompt_id, error) from None
    return image


def _image_digest(value: Mapping[str, Any] | None) -> bytes:
    """Hash decoded pixels, so the same picture hashes equal whatever file format holds it."""
    if value is None:
        return b"no-image\n"
    with open_image(value) as im:
        im.load()
        pixels = hashlib.sha256(im.tobytes())
        palette = im.getpalette() if im.mode in ("P", "PA") else None
        if palette is not None:
            pixels.update(bytes(palette))
        return f"{im.mode} {im.width}x{im.height} ".encode() + pixels.digest() + b"\n"


def prompt_set_hash(ds: datasets.Dataset, batch_size: int = 256) -> str:
    """A sha256 over every row's text fields and decoded image pixels, in row order.

    Row order is part of the content: activation caches are stored by row, so a reordered set is a
    different set for them.
    """
    ds = check_schema(ds, "the dataset to hash")
    digest = hashlib.sha256(_HASH_VERSION)
    raw = ds.with_format("arrow")  # undecoded {bytes, path} structs for images; respects select/filter
    for start in range(0, len(ds), batch_size):
        for row in raw[start : start + batch_size].to_pylist():
            fields = [row[c] for c in TEXT_COLUMNS]
            digest.update(json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n")
            try:
                digest.update(_image_digest(row["image"]))
            except Exception as error:  # PIL raises several types for truncated or foreign bytes
                raise _bad_image(row["id"], error) from None
    return digest.hexdigest()


class PromptSource(ABC):
    """A configurable producer of one prompt set."""

    identity_ignores: ClassVar[tuple[str, ...]] = ()
    """Arguments that only say where inputs are (a folder) while ``identity`` hashes what is read there."""

    @abstractmethod
    def load(self) -> datasets.Dataset:
        """Return the prompt set (columns of ``FEATURES``)."""

    def identity(self) -> dict[str, Any] | None:
        """What the rendered rows depend on, stated without rendering them (``sahs.prompts.identity``).

        None means this source cannot state it: a cache of it is then checked by rendering and hashing its rows.
        """
        return None

    def digest(self) -> str | None:
        """sha256 of ``identity()``; None when the source cannot state one (a definition holding something
        unhashable, or inputs that cannot be read, which ``load`` then reports)."""
        try:
            identity = self.identity()
        except (Unstated, OSError):
            return None
        return None if identity is None else identity_digest(identity)

    def provenance(self) -> dict[str, Provenance]:
        """Licence and origin of each row, keyed by id; empty when the source does not record them."""
        return {}


class Mixture(PromptSource):
    """Several prompt sources concatenated, optionally keeping only some attack families."""

    def __init__(self, sources: list[PromptSource], attacks: list[str] | None = None) -> None:
        """
        Args:
            sources: Prompt sources to concatenate, in order; their ids must not collide.
            attacks: Attack families to keep (e.g. ``["text", "figstep"]``); None keeps all.
        """
        if not sources:
            raise ValueError("Mixture needs at least one source")
        self.sources = sources
        self.attacks = attacks

    def load(self) -> datasets.Dataset:
        parts = [check_schema(s.load(), f"source {i} ({type(s).__name__})") for i, s in enumerate(self.sources)]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        collisions = sorted(rid for rid, n in Counter(ds["id"]).items() if n > 1)
        if collisions:
            raise ValueError(f"Mixture: {len(collisions)} ids occur in more than one source, e.g. {collisions[:10]}")
        if self.attacks is None:
            return ds
        present = set(ds["attack"])
        unknown = sorted(set(self.attacks) - present)
        if unknown:
            raise ValueError(f"Mixture: attack families {unknown} are not in the sources (found {sorted(present)})")
        keep = set(self.attacks)
        # In memory: filtering a set loaded from disk must not write cache files into its folder.
        return ds.filter(lambda attack: attack in keep, input_columns="attack", keep_in_memory=True)

    def provenance(self) -> dict[str, Provenance]:
        return {rid: p for source in self.sources for rid, p in source.provenance().items()}

    def identity(self) -> dict[str, Any] | None:
        return describe(self, {})  # each source's identity is part of the arguments



class SavedPrompts(PromptSource):
    """A prompt set written earlier with ``save_to_disk`` (for example by ``sahs data build``)."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: Folder written by ``Dataset.save_to_disk``.
        """
        self.path = path

    def load(self) -> datasets.Dataset:
        folder = Path(self.path).expanduser()
        if not (folder / "dataset_info.json").is_file():
            raise SavedSetNotFoundError(
                f"{folder} holds no saved prompt set (no dataset_info.json); "
                "build one with `sahs data build --config configs/data/offline.yaml`"
            )
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
        if state.get("_data_files") == []:  # datasets itself fails on it with an IndexError
            raise EmptyPromptSetError(f"the saved prompt set at {folder} holds no prompts: rebuild it "
                                      "(`sahs data build`) or point `path` at another set")
        return check_schema(datasets.load_from_disk(str(folder)), f"saved prompt set {folder}")

    identity_ignores = ("path",)

    def identity(self) -> dict[str, Any] | None:
        """The bytes of the set's own files (its arrow data, schema and state), wherever the folder is."""
        folder = Path(self.path).expanduser()
        state = json.loads((folder / "state.json").read_text())
        names = ["dataset_info.json", "state.json", *(f["filename"] for f in state.get("_data_files", []))]
        return describe(self, {"files": {name: file_digest(folder / name) for name in names}})

    def provenance(self) -> dict[str, Provenance]:
        file = Path(self.path).expanduser() / PROVENANCE_FILE
        if not file.is_file():
            return {}
        rows = (json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line)
        return {r["id"]: Provenance(r["licence"], r["origin"]) for r in rows}
