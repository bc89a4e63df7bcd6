"""Where a verb's run landed: every run has its own folder ``<root>/<verb>/<run name>``."""

from __future__ import annotations

from pathlib import Path


def newest_run(root: Path, verb: str) -> Path:
    """The folder of the latest ``sahs <verb>`` run under ``root``."""
    return max((Path(root) / verb).iterdir(), key=lambda path: path.stat().st_mtime_ns)
