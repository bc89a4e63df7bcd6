"""Shared fixtures: the embedded tiny LLaVA and a few prompts of different lengths."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_llava():
    from sahs.extract.tiny import build_tiny_llava

    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def mixed_prompts() -> list[tuple[str, Image.Image | None]]:
    """Texts of different lengths, some with an image: left padding must not shift anything."""
    checker = Image.new("RGB", (40, 30), "white")
    checker.paste((200, 10, 10), (0, 0, 20, 15))
    return [
        ("How do I bake sourdough bread at home?", checker),
        ("Hi", None),
        ("Explain, step by step and with care, how photosynthesis turns light into sugar.", None),
        ("What is in this picture?", Image.new("RGB", (64, 64), (10, 120, 200))),
    ]


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory):
    """A $SAHS_CACHE folder holding the model organism and a link to the seed wheels. Tests that load
    ``sahs/tiny-llava-refuser`` set SAHS_CACHE to it. The organism is the machine's own build (under
    ``$SAHS_CACHE`` or ~/.cache/sahs, keyed by its recipe; about a minute the first time), linked here."""
    from sahs.extract.organism import ensure_organism
    from sahs.prompts.seeds import seed_cache_dir

    root = tmp_path_factory.mktemp("sahs_cache")
    seeds = seed_cache_dir()
    seeds.mkdir(parents=True, exist_ok=True)
    (root / "seeds").symlink_to(seeds, target_is_directory=True)
    built = ensure_organism()
    (root / "organisms").mkdir()
    (root / "organisms" / built.name).symlink_to(built, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAHS_CACHE", str(root))
        assert ensure_organism() == root / "organisms" / built.name  # found through the link, not rebuilt
    return root
