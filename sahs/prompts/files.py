"""Users' own prompt files: JSONL, CSV, Parquet or a hub dataset, mapped column by column to the schema.

The file is read with ``datasets.load_dataset``; ``columns`` says which of its columns holds each
schema field, so no file has to be rewritten first. Relative image paths are resolved against the
file's folder. Every error names the file, the row (counted from 1, header excluded) and the column.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets.exceptions import DatasetGenerationError
from PIL import Image

from sahs.errors import UserError
from sahs.prompts.benchmarks.base import OnBadImage, image_problem
from sahs.prompts.identity import RowHasher, describe
from sahs.prompts.schema import LABEL_NAMES, PromptSource, make_dataset

FileFormat = Literal["auto", "json", "csv", "parquet", "hub"]
_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class PromptFileError(UserError, ValueError):
    """A prompt file that cannot be read as prompts: empty, malformed, or without a mapped column."""


class PromptFileNotFoundError(UserError, FileNotFoundError):
    """A prompt file path that names no file."""


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file first fails to parse as one object per line, or None if every line does."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.strip())
            except json.JSONDecodeError as error:
                return f"line {number} (character {error.colno}): {error.msg}"
            if not isinstance(value, dict):
                return f"line {number}: a JSON {type(value).__name__}, not an object"
    return None


def unreadable_file(path: Path, fmt: str, error: BaseException) -> PromptFileError:
    """One line for a file that ``datasets`` cannot parse: the line at fault for JSON Lines, else the parser's
    reason."""
    if fmt == "json":
        try:
            json.loads(path.read_text(encoding="utf-8"))  # one JSON document (a list of rows) parses whole
        except (ValueError, UnicodeDecodeError):
            if (where := _bad_json_line(path)) is not None:
                return PromptFileError(f"prompt file {path}, {where}: not a valid JSON object; write one JSON "
                                       "object per line, e.g. {\"text\": \"...\", \"label\": 0}, and fix that line")
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    reason = " ".join(str(cause).split()) or type(cause).__name__
    return PromptFileError(f"prompt file {path} cannot be read as {fmt}: {reason}; fix the file, or set `format` "
                           "if its suffix misleads")


@dataclass
class Columns:
    """Which column of the file holds each schema field; None means the file has no such column.

    ``image`` and ``id`` are read from columns of those names when the file has them (a file without them
    is fine); set them to None to ignore such a column, or to another name to read that one instead.

    Args:
        text: The prompt text.
        image: An image path (relative to the file), or an image column of a Parquet / hub dataset.
        label: The label: 0/1, "benign"/"malicious", or strings mapped by ``labels``.
        attack: The attack family; without it every row gets ``attack``.
        group: The underlying request (rows rendering one request share it); without it each row is its own.
        id: A unique prompt id; without it ids are ``<source>-<row>``.
        category: The harm category or topic; without it every row gets ``category``.
    """

    text: str = "text"
    image: str | None = "image"
    label: str | None = "label"
    attack: str | None = None
    group: str | None = None
    id: str | None = "id"
    category: str | None = None


# Fields read from a column of this name if the file has one, and left out (not an error) if it has not.
IF_PRESENT = {"image": "image", "id": "id"}


class PromptFile(PromptSource):
    """A prompt set of your own: a JSONL, CSV or Parquet file, or a dataset on the hub (or in a local folder)."""

    def __init__(
        self,
        path: str,
        columns: Columns | None = None,
        labels: dict[str, int] | None = None,
        label: Literal[0, 1] | None = None,
        attack: str = "text",
        category: str = "unspecified",
        source: str | None = None,
        format: FileFormat = "auto",
        split: str = "train",
        subset: str | None = None,
        revision: str | None = None,
        on_bad_image: OnBadImage = "error",
    ) -> None:
        """
        Args:
            path: The file, or a hub dataset id / dataset folder (read with ``datasets.load_dataset``).
            columns: Which column holds each schema field (text, image, label, attack, group, id, category).
            labels: String label -> 0 or 1, e.g. ``{"safe": 0, "unsafe": 1}``; None accepts 0/1 and benign/malicious.
            label: The label of every row when ``columns.label`` is None (a file of benign prompts only).
            attack: Attack family of every row when ``columns.attack`` is None.
            category: Category of every row when ``columns.category`` is None.
            source: Name in the ``source`` column and id prefix; the file's stem by default.
            format: "json" (JSON Lines too), "csv", "parquet", "hub", or "auto" from the file suffix.
            split: Split of a hub dataset to read.
            subset: Configuration name of a hub dataset.
            revision: Revision of a hub dataset (a commit hash pins it).
            on_bad_image: Drop prompts with a missing or unreadable image, with a warning ("skip"), or stop ("error").
        """
        self.path = path
        self.columns = columns if columns is not None else Columns()
        self.labels = None if labels is None else {str(k): v for k, v in labels.items()}
        bad = {k: v for k, v in (self.labels or {}).items() if isinstance(v, bool) or v not in (0, 1)}
        if bad:
            raise ValueError(f"labels must map to 0 (benign) or 1 (malicious); got {bad}")
        if self.columns.label is None and label is None:
            raise ValueError("set columns.label to the file's label column, or label: 0/1 for a file of one class")
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.label, self.attack, self.category = label, attack, category
        self.source = source
        self.format = format
        self.split, self.subset, self.revision = split, subset, revision
        self.on_bad_image = on_bad_image

    def _format(self) -> str:
        if self.format != "auto":
            return self.format
        local = Path(self.path).expanduser()
        return _SUFFIXES.get(local.suffix.lower(), "hub") if local.is_file() else "hub"

    def read(self) -> tuple[datasets.Dataset, Path | None]:
        """The raw table, and the folder relative image paths are resolved against (None for a hub id)."""
        fmt = self._format()
        local = Path(self.path).expanduser()
        if fmt == "hub":
            table = datasets.load_dataset(self.path, name=self.subset, split=self.split, revision=self.revision)
            return table, (local if local.is_dir() else None)
        if not local.is_file():
            raise PromptFileNotFoundError(f"prompt file {local} not found; set `path` to a .jsonl, .csv or "
                                          ".parquet file")
        empty = PromptFileError(f"prompt file {local} holds no prompts: write one prompt per line (JSONL) or "
                                "row (CSV), or set `path` to another file")
        if local.stat().st_size == 0:
            raise empty
        try:
            table = datasets.load_dataset(fmt, data_files=str(local), split="train")
        except (DatasetGenerationError, StopIteration, ValueError) as error:
            if isinstance(error, StopIteration) or "corresponds to no data" in str(error):
                raise empty from None  # a file of blank lines
            raise unreadable_file(local, fmt, error) from None
        if len(table) == 0:
            raise empty
        return table, local.parent

    def _records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each row of the file as a schema record (images not yet read), with where it is for messages."""
        table, base = self.read()
        where = f"prompt file {self.path}"
        mapping = {field: name for field, name in vars(self.columns).items() if name is not None
                   and not (IF_PRESENT.get(field) == name and name not in table.column_names)}
        missing = {field: name for field, name in mapping.items() if name not in table.column_names}
        if missing:
            fields = ", ".join(f"columns.{field} = {name!r}" for field, name in missing.items())
            fix = ("; or, for a file of one class, set `columns.label: null` and `label: 0` or `label: 1`"
                   if "label" in missing else "")
            raise PromptFileError(f"{where} has no column for {fields}; its columns are {table.column_names}: "
                                  f"name the right ones in `columns`{fix}")
        image_column = mapping.get("image")
        if image_column and isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))  # {bytes, path}, read below
        source = self.source or Path(str(self.path).rstrip("/")).stem or "prompts"
        for index, row in enumerate(table.select_columns(sorted(set(mapping.values())))):
            at = f"{where}, row {index + 1}"
            yield at, self._record(row, mapping, source, index, at, base)

    def load(self) -> datasets.Dataset:
        records, bad = [], []
        image_column = self.columns.image
        for at, record in self._records():
            problem = image_problem(record["image"]) if isinstance(record["image"], dict) else None
            if problem is not None:
                bad.append(f"{at}, column {image_column!r}: {problem}")
                continue
            records.append(record)
        if bad and self.on_bad_image == "error":
            raise PromptFileError(f"{len(bad)} prompts have a missing or unreadable image: {'; '.join(bad[:10])}. "
                                  "Fix the paths (relative ones are read from the file's folder) or set "
                                  "on_bad_image: skip")
        if bad:
            warnings.warn(f"dropped {len(bad)} prompts with a missing or unreadable image: {'; '.join(bad[:10])}",
                          stacklevel=2)
        return make_dataset(records)

    identity_ignores = ("path",)  # where the file is; its rows (with the source name taken from it) are hashed

    def identity(self) -> dict[str, Any]:
        """The file's rows as mapped to the schema, images by their bytes: the file is read, nothing is drawn."""
        hasher = RowHasher()
        for _, record in self._records():
            hasher.add(record)
        return describe(self, {"rows": hasher.hexdigest(), "count": hasher.count})

    def _record(self, row: dict[str, Any], mapping: dict[str, str], source: str, index: int, at: str,
                base: Path | None) -> dict[str, Any]:
        """One schema record from one row of the file."""

        def text_of(field: str, default: str | None) -> str | None:
            if field not in mapping:
                return default
            value = row[mapping[field]]
            if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
                if field == "text":
                    raise PromptFileError(f"{at}, column {mapping[field]!r}: the text is empty")
                return default
            return str(value)

        rid = text_of("id", None) or f"{source}-{index + 1:06d}"
        return dict(
            id=rid,
            text=text_of("text", None),
            image=self._image(row[mapping["image"]], base, at, mapping["image"]) if "image" in mapping else None,
            label=self._label(row[mapping["label"]], at, mapping["label"]) if "label" in mapping else self.label,
            attack=text_of("attack", self.attack),
            source=source,
            category=text_of("category", self.category),
            group=text_of("group", rid),
        )

    def _label(self, value: Any, at: str, column: str) -> int:
        """0 or 1 from an int, an integral float, "0"/"1", benign/malicious, or the ``labels`` mapping."""
        if self.labels is not None:
            key = str(value).strip()
            if key not in self.labels:
                raise PromptFileError(f"{at}, column {column!r}: label {value!r} is not in labels "
                                      f"{sorted(self.labels)}; "
                                 "add it to `labels`")
            return self.labels[key]
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, float)) and value in (0, 1):
            return int(value)
        if isinstance(value, str) and value.strip().lower() in ("0", "1", *LABEL_NAMES):
            key = value.strip().lower()
            return int(key) if key in ("0", "1") else LABEL_NAMES.index(key)
        raise PromptFileError(f"{at}, column {column!r}: label {value!r} is not 0/1 or benign/malicious; "
                         "map string labels with `labels`, e.g. {safe: 0, unsafe: 1}")

    def _image(self, value: Any, base: Path | None, at: str, column: str) -> dict[str, Any] | Image.Image | None:
        """An image entry: a path (relative ones resolved against ``base``), a {bytes, path} struct or a PIL image."""
        empty_cell = isinstance(value, float) and value != value  # an empty CSV cell may read as NaN
        if value is None or empty_cell or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if value.get("bytes"):
                return {"bytes": value["bytes"], "path": None}
            value = value["path"]
        if not isinstance(value, str):
            raise PromptFileError(f"{at}, column {column!r}: expected an image path or image, "
                                  f"got {type(value).__name__}")
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return {"path": str(path), "bytes": None}
