"""Prompts in, decisions out, as JSON lines: what ``sahs guard`` streams between stdin/stdout or files.

Each input line is ``{"text": ..., "image": "path/to.png"}`` (``image`` optional; a relative path is read
from the input file's folder) and may carry an ``id``. Each output line is ``{"id"?, "score", "flagged",
"answer"}``, in input order, written as soon as its batch is decided. A line that cannot be answered
(not JSON, no text, an unreadable image, a failed generation) gets ``{"id" or "line", "error"}`` in its
place and the others go on: nothing read is lost. Output is strict JSON (a non-finite score is null).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from sahs.guard.guard import SafetyGuard


@dataclass
class LineError:
    """An input line that gets an error instead of an answer: its id if it has one, else its line number."""

    number: int
    message: str
    id: Any = None

    def to_dict(self) -> dict[str, Any]:
        where = {"id": self.id} if self.id is not None else {"line": self.number}
        return where | {"error": self.message}


@dataclass
class GuardCounts:
    """How many lines were answered and how many got an error."""

    answered: int = 0
    failed: int = 0
    """Lines with an error field (those refused for a non-finite score are also answered)."""
    failures: list[str] = field(default_factory=list)
    """The first few error lines, for the summary."""


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGB")


def read_prompts(lines: TextIO, base: Path, source: str = "input") -> Iterator[dict[str, Any] | LineError]:
    """Parse prompt lines (blank lines skipped) and open their images; a bad line becomes a ``LineError``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield LineError(number, f"{source} line {number} is not JSON ({error.msg}): write one JSON object a line")
            continue
        prompt_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            yield LineError(number, f"{source} line {number} needs a \"text\" string, e.g. "
                                    "{\"text\": \"...\", \"image\": \"a.png\"}", prompt_id)
            continue
        image = record.get("image")
        if image is not None:
            if not isinstance(image, str):
                yield LineError(number, f"{source} line {number}: \"image\" must be a path string", prompt_id)
                continue
            path = Path(image) if Path(image).is_absolute() else base / image
            if not path.is_file():
                yield LineError(number, f"{source} line {number}: image {path} is not a file", prompt_id)
                continue
            try:
                record["image"] = _open_image(path)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                yield LineError(number, f"{source} line {number}: image {path} cannot be read ({error})", prompt_id)
                continue
        record["_line"] = number
        yield record


def _answer(guard: SafetyGuard, records: list[dict[str, Any]], generate_kwargs: dict[str, Any]) -> list[Any]:
    """One result per record: the batch at once, or, if it fails, each record alone (a failure is its error)."""
    try:
        return list(guard.generate(records, **generate_kwargs))
    except Exception as error:  # noqa: BLE001  (the batch failed: find the line that did, answer the others)
        if len(records) == 1:
            return [_failed(records[0], error)]
    answers: list[Any] = []
    for record in records:
        try:
            answers += guard.generate([record], **generate_kwargs)
        except Exception as error:  # noqa: BLE001  (one prompt's failure must not lose the others)
            answers.append(_failed(record, error))
    return answers


def _failed(record: dict[str, Any], error: Exception) -> LineError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return LineError(record["_line"], f"line {record['_line']}: generation failed ({type(error).__name__}: {reason})",
                     record.get("id"))


def guard_jsonl(guard: SafetyGuard, lines: TextIO, sink: TextIO, *, base: Path = Path("."), source: str = "input",
                **generate_kwargs: Any) -> GuardCounts:
    """Screen and answer every prompt of ``lines`` in batches of ``guard.batch_size``, one output line per input
    line in input order; returns how many were answered and how many got an error."""
    counts = GuardCounts()
    pending: list[dict[str, Any] | LineError] = []  # in input order; the records among them form the batch

    def write(out: dict[str, Any]) -> None:
        sink.write(json.dumps(out, allow_nan=False) + "\n")

    def flush() -> None:
        records = [entry for entry in pending if not isinstance(entry, LineError)]
        answers = iter(_answer(guard, records, generate_kwargs) if records else [])
        for entry in pending:
            result = entry if isinstance(entry, LineError) else next(answers)
            if isinstance(result, LineError):
                counts.failed += 1
                counts.failures.append(result.message)
                write(result.to_dict())
            else:
                counts.answered += 1
                if result.error:  # refused for a score that is not a number: answered, and reported
                    counts.failed += 1
                    counts.failures.append(f"line {entry['_line']}: {result.error}")
                write(({"id": entry["id"]} if "id" in entry else {}) | result.to_dict())
        sink.flush()
        pending.clear()

    for entry in read_prompts(lines, base, source):
        pending.append(entry)
        if sum(not isinstance(e, LineError) for e in pending) == guard.batch_size:
            flush()
    flush()
    return counts
