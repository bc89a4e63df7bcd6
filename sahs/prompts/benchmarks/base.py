"""What every benchmark loader shares: reading the benchmark's own files and checking its images.

A loader reads a benchmark as it is laid out on disk after download (the layout is documented on
each class) and returns the schema's rows. Missing files raise an error that names the path and
where the benchmark comes from; unreadable images are reported by id and either dropped with a
warning or turned into an error, as ``on_bad_image`` says, never silently.
"""

from __future__ import annotations

import csv
import json
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets

from sahs.errors import UserError
from sahs.prompts.identity import RowHasher, describe
from sahs.prompts.schema import PromptSource, Provenance, make_dataset, open_image

OnBadImage = Literal["skip", "error"]


class BenchmarkNotFoundError(UserError, FileNotFoundError):
    """A benchmark file or folder that is not where the loader's root says (not downloaded, or another root)."""


class BenchmarkSource(PromptSource):
    """Base of the loaders: a root folder, an image policy, and the benchmark's identity for messages."""

    benchmark: ClassVar[str]  # name used in messages and as ``source``
    home: ClassVar[str]  # where to download it
    layout: ClassVar[str]  # one line describing the expected files under ``root``

    def __init__(self, root: str, on_bad_image: OnBadImage = "error") -> None:
        """
        Args:
            root: Folder of the downloaded benchmark.
            on_bad_image: Drop prompts with a missing or unreadable image, with a warning ("skip"), or stop ("error").
        """
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root = root
        self.on_bad_image = on_bad_image

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()

    def require(self, path: Path, what: str) -> Path:
        """Return ``path`` if it exists, else raise naming it, the benchmark and where to get it."""
        if not path.exists():
            raise BenchmarkNotFoundError(
                f"{self.benchmark}: {what} not found at {path}. Expected layout under the root folder: "
                f"{self.layout}. Download {self.benchmark} from {self.home} into {self.root_path}, or point the "
                "loader's root there (`--benchmarks_root DIR` or $SAHS_BENCHMARKS for the shipped configs)."
            )
        return path

    def read_json(self, path: Path, what: str) -> Any:
        return json.loads(self.require(path, what).read_text(encoding="utf-8"))

    def read_csv(self, path: Path, what: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
        """Rows of a csv file, after checking that it has the named columns."""
        with self.require(path, what).open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(columns) - set(reader.fieldnames or ()))
            if missing:
                raise ValueError(f"{self.benchmark}: {path} lacks columns {missing} (has {reader.fieldnames})")
            return list(reader)

    @abstractmethod
    def rows(self, images: bool = True) -> list[dict[str, Any]]:
        """Schema rows plus an ``origin`` entry (the file, and the key or line, the row comes from).

        ``images=False`` lets a loader skip reading image data it would otherwise hold in memory.
        """

    def load(self) -> datasets.Dataset:
        rows = self._drop_bad_images(self.rows())
        return make_dataset([{k: v for k, v in row.items() if k != "origin"} for row in rows])

    identity_ignores = ("root", "path", "image_dir")  # where the files are; what is read there is hashed

    def identity(self) -> dict[str, Any]:
        """The benchmark's rows as read from its files, images by their bytes: nothing is decoded or drawn."""
        hasher = RowHasher()
        for row in self.rows():
            hasher.add({k: v for k, v in row.items() if k != "origin"})
        return describe(self, {"rows": hasher.hexdigest(), "count": hasher.count})

    def provenance(self) -> dict[str, Provenance]:
        licence = f"as published by {self.benchmark} ({self.home})"
        return {row["id"]: Provenance(licence, row["origin"]) for row in self.rows(images=False)}

    def _drop_bad_images(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bad = {row["id"]: problem for row in rows if (problem := image_problem(row["image"])) is not None}
        if not bad:
            return rows
        details = "; ".join(f"{rid}: {problem}" for rid, problem in list(bad.items())[:10])
        if self.on_bad_image == "error":
            raise ValueError(
                f"{self.benchmark}: {len(bad)} prompts have a missing or unreadable image ({details}"
                f"{'; ...' if len(bad) > 10 else ''}). Set on_bad_image: skip to drop them. Ids: {sorted(bad)}"
            )
        warnings.warn(f"{self.benchmark}: dropped {len(bad)} prompts with a missing or unreadable image, "
                      f"ids {sorted(bad)} ({details})", stacklevel=2)
        return [row for row in rows if row["id"] not in bad]


def image_problem(image: dict[str, Any] | None) -> str | None:
    """Why an image entry cannot be used (missing file, undecodable data), or None when it decodes."""
    if image is None:
        return None
    path = image.get("path")
    if not image.get("bytes") and path and not Path(path).is_file():
        return f"missing file {path}"
    try:
        with open_image(image) as im:
            im.load()  # a full decode: truncated or corrupt data fails here, not at extraction time
    except Exception as error:  # Pillow raises several unrelated types for bad data
        return f"{type(error).__name__}: {error}"
    return None


def image_file(path: Path) -> dict[str, Any]:
    """An image column entry that refers to a file (``save_to_disk`` copies its bytes in)."""
    return {"path": str(path), "bytes": None}
