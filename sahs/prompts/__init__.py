"""Prompt sets: one schema, the built-in attack sets, and loaders for published benchmarks."""

from sahs.prompts.attacks import ATTACK_FAMILIES, FIGSTEP_PROMPT, TYPO_PROMPT
from sahs.prompts.files import Columns, PromptFile
from sahs.prompts.schema import (
    FEATURES,
    Mixture,
    PromptSource,
    Provenance,
    SavedPrompts,
    make_dataset,
    prompt_set_hash,
)
from sahs.prompts.synthetic import DemoPrompts, OfflineAttackSet

__all__ = [
    "ATTACK_FAMILIES",
    "Columns",
    "FEATURES",
    "FIGSTEP_PROMPT",
    "TYPO_PROMPT",
    "DemoPrompts",
    "Mixture",
    "OfflineAttackSet",
    "PromptFile",
    "PromptSource",
    "Provenance",
    "SavedPrompts",
    "make_dataset",
    "prompt_set_hash",
]
