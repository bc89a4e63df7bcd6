"""Prompts in, decisions out, as JSON lines: what ``sahs guard`` streams between stdin/stdout or files.

Each input line is ``{"text": ..., "image": "path/to.png"}`` (``image`` optional; a relative path is read
from the input file's folder) and may carry an ``id``. Each output line is ``{"id"?, "score", "flagged",
"answer"}``, in input order, written as soon as its batch is decided.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from sahs.guard.guard import SafetyGuard


def read_prompts(lines: TextIO, base: Path, source: str = "input") -> Iterator[dict[str, Any]]:
    """Parse prompt lines (blank lines skipped); a bad line is reported by its number."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} line {number} is not JSON ({error.msg}): write one JSON object a line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{source} line {number} needs a \"text\" string, e.g. {{\"text\": \"...\", \"image\": \"a.png\"}}")
        image = record.get("image")
        if image is not None:
            path = Path(image) if Path(image).is_absolute() else base / image
            if not path.is_file():
                raise FileNotFoundError(f"{source} line {number}: image {path} does not exist")
            record["image"] = path
        yield record


def guard_jsonl(guard: SafetyGuard, lines: TextIO, sink: TextIO, *, base: Path = Path("."), source: str = "input",
                **generate_kwargs: Any) -> int:
    """Screen and answer every prompt of ``lines`` in batches of ``guard.batch_size``; returns how many."""
    batch: list[dict[str, Any]] = []
    written = 0

    def flush() -> None:
        nonlocal written
        for record, result in zip(batch, guard.generate(batch, **generate_kwargs)):
            out = ({"id": record["id"]} if "id" in record else {}) | result.to_dict()
            sink.write(json.dumps(out) + "\n")
        sink.flush()
        written += len(batch)
        batch.clear()

    for record in read_prompts(lines, base, source):
        batch.append(record)
        if len(batch) == guard.batch_size:
            flush()
    if batch:
        flush()
    return written
