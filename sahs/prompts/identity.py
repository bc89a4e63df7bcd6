"""A prompt source's identity: a hash of its definition and of what it reads, stated without rendering.

Rendering a set (drawing images, encoding them, hashing their pixels) costs tens of seconds per thousand
rows; stating its identity costs reading its inputs (the 2,000-prompt demo set: 0.4 s). The identity
covers everything a rendered row depends on: the source's class and arguments, the code of the modules
that render it, and the content it reads (seed requests, files, image bytes). ``PromptSet`` uses it to
name a cache's prompt set: a cache made for the same identity is reused without rendering; otherwise the
set is rendered and its rows hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import sys
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import PIL
from PIL import Image

# Bump when what an identity hashes changes, so identities from older code stop matching.
IDENTITY_VERSION = "sahs-prompt-source/v1"

# Modules that render nothing: how an identity is hashed (IDENTITY_VERSION says when that changes) and the
# error type. Leaving them out keeps caches reusable across edits that cannot change a row.
_NOT_RENDERING = frozenset({"sahs.prompts.identity", "sahs.errors"})

_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime, ctime, inode) -> sha256


class Unstated(Exception):
    """A definition holds something whose identity cannot be stated: the set must be rendered to be named."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read once per process while its size and times stay the same."""
    resolved = Path(path).expanduser().resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with resolved.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def _sahs_modules(module: ModuleType) -> set[ModuleType]:
    """``module`` and every sahs module it reaches through its globals (imported modules, functions, classes)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current.__name__ in seen:
            continue
        seen.add(current.__name__)
        for value in vars(current).values():
            name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(name, str) and (name == "sahs" or name.startswith("sahs.")) and name not in seen:
                found = sys.modules.get(name) or importlib.import_module(name)
                todo.append(found)
    return {sys.modules[name] for name in seen}


def code_modules(cls: type) -> list[ModuleType]:
    """The modules whose code renders ``cls``'s rows: those defining it and its bases (a subclass of your own
    too), and every sahs module they reach."""
    modules: set[ModuleType] = set()
    for klass in inspect.getmro(cls):
        module = sys.modules.get(klass.__module__)
        if module is None or klass.__module__ in ("builtins", "abc"):
            continue
        modules |= _sahs_modules(module) if klass.__module__.startswith("sahs.") else {module}
    return sorted((m for m in modules if m.__name__ not in _NOT_RENDERING), key=lambda m: m.__name__)


def code_digest(cls: type) -> str:
    """sha256 of the source files of ``code_modules(cls)``: an edit to the code that renders the rows changes it."""
    digest = hashlib.sha256()
    for module in code_modules(cls):
        source = getattr(module, "__file__", None)
        digest.update(f"{module.__name__}\n".encode())
        digest.update(Path(source).read_bytes() if source else b"<no source>")
        digest.update(b"\n")
    return digest.hexdigest()


def canonical(value: Any) -> Any:
    """A definition as plain JSON: nested sources become their identities, dataclasses their fields."""
    from sahs.prompts.schema import PromptSource

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PromptSource):
        identity = value.identity()
        if identity is None:
            raise Unstated(f"{type(value).__name__} states no identity")
        return identity
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"dataclass": f"{type(value).__module__}.{type(value).__qualname__}", **fields}
    raise Unstated(f"cannot state the identity of a {type(value).__name__} argument")


def image_digest(image: Any) -> str:
    """What a stored image's content is, without decoding it: its bytes' (or file's) sha256."""
    if image is None:
        return "no-image"
    if isinstance(image, Image.Image):  # already decoded: its pixels
        return f"pixels:{image.mode}:{image.size}:{hashlib.sha256(image.tobytes()).hexdigest()}"
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return "bytes:" + hashlib.sha256(image["bytes"]).hexdigest()
        path = image.get("path")
        if path:
            try:
                return "bytes:" + file_digest(path)
            except OSError:  # a missing file: the row is dropped or refused, as on_bad_image says
                return "missing"
    raise Unstated(f"cannot state the identity of an image entry {type(image).__name__}")


class RowHasher:
    """sha256 over rows before rendering: every field as JSON, images by their stored bytes."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.count = 0

    def add(self, row: Mapping[str, Any]) -> None:
        fields = {k: v for k, v in row.items() if k != "image"}
        line = json.dumps(canonical(fields), sort_keys=True, ensure_ascii=False)
        self._digest.update(line.encode("utf-8") + b"\n" + image_digest(row.get("image")).encode() + b"\n")
        self.count += 1

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def rows_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """``RowHasher`` over ``rows``."""
    hasher = RowHasher()
    for row in rows:
        hasher.add(row)
    return hasher.hexdigest()


def describe(source: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The identity record of ``source``: version, class, code, Pillow's version (it decodes and draws the
    images), its public attributes (its arguments, less those that only locate ``inputs``) and its inputs."""
    cls = type(source)
    ignored = set(getattr(source, "identity_ignores", ()))
    arguments = {k: v for k, v in vars(source).items() if not k.startswith("_") and k not in ignored}
    return {
        "version": IDENTITY_VERSION,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "code": code_digest(cls),
        "pillow": PIL.__version__,
        "arguments": canonical(arguments),
        "inputs": canonical(dict(inputs)),
    }


def identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 of an identity record, as canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class PromptSet:
    """A prompt source whose rows are rendered only when needed, and the cache fingerprint's ``prompts`` field.

    The field is ``{"sha256", "count", "source"}``: the hash of the rendered rows (``prompt_set_hash``),
    their number, and the source's identity digest (None for a set given as rows, or a source that cannot
    state one). The cache pins its manifest's ids, labels, attacks and groups itself (``rows``).
    """

    def __init__(self, source: Any) -> None:
        from sahs.prompts.schema import PromptSource

        if not isinstance(source, (PromptSource, datasets.Dataset)):
            raise TypeError(f"a prompt set is a PromptSource or a datasets.Dataset, got {type(source).__name__}")
        self.source = source
        if isinstance(source, datasets.Dataset):
            self.__dict__["rows"] = source

    @classmethod
    def of(cls, prompts: Any) -> PromptSet:
        """``prompts`` itself if it is a ``PromptSet`` (so that it renders once), else one around it."""
        return prompts if isinstance(prompts, PromptSet) else cls(prompts)

    @cached_property
    def digest(self) -> str | None:
        """The source's identity digest, or None (a set given as rows, or a source that cannot state one)."""
        return None if isinstance(self.source, datasets.Dataset) else self.source.digest()

    @cached_property
    def rows(self) -> datasets.Dataset:
        """The rendered set (``source.load()``), made on first use."""
        return self.source.load()

    @cached_property
    def field(self) -> dict[str, Any]:
        """The ``prompts`` field of a fingerprint for the rendered rows (renders them)."""
        from sahs.prompts.schema import prompt_set_hash

        rows = self.rows
        return {"sha256": prompt_set_hash(rows), "count": len(rows), "source": self.digest}

    def same_source(self, recorded: Any) -> dict[str, Any] | None:
        """``recorded`` (a fingerprint's ``prompts`` field) when it names this source's identity: no rendering."""
        if isinstance(recorded, dict) and self.digest is not None and recorded.get("source") == self.digest:
            return recorded
        return None

    def same_rows(self, recorded: Any) -> bool:
        """The rendered rows hash as ``recorded`` says (renders them): a cache made by an older definition of
        the same set, or before identities were recorded."""
        return (isinstance(recorded, dict) and recorded.get("sha256") == self.field["sha256"]
                and recorded.get("count") == self.field["count"])
