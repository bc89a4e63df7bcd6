"""Head ablation as an experiment: do the located safety heads carry the refusal?

Answers are generated for the same prompts under three kinds of setting: no ablation, the top-k
heads of the ranking ablated, and k random heads (never a top-k one) ablated, once per seed. A
refusal judge reads every answer; ``AblationResult`` turns the verdicts into the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import torch
from transformers import PreTrainedModel

from sahs.eval.refusal import PhraseJudge, RefusalJudge
from sahs.experiments.ablation_report import AblationResult, AblationSetting
from sahs.extract.adapters import find_adapter
from sahs.extract.generation import generate_answers
from sahs.extract.interventions import AblationError, ablated_heads, check_heads, head_means


@dataclass
class AblationSettings:
    """How heads are ablated and answers judged.

    Args:
        k: Heads ablated in the top-k setting and in each random setting.
        seeds: Seeds of the random-head control, one setting each; they must differ.
        mode: ``zero`` writes zeros into the heads' slices, ``mean`` their mean over benign training prompts.
        max_new_tokens: Tokens generated per answer (greedy decoding).
        batch_size: Prompts per generation batch.
        reference_size: Benign training prompts whose per-head means ``mean`` ablation writes.
        judge: Refusal judge (``class_path`` / ``init_args``); None: the refusal-phrase matcher ``PhraseJudge()``.
        heads: ``[[layer, head], ...]`` ablated in the top setting instead of the probe ranking's top k (e.g. the
            top heads of ``sahs patch``, its ``top_heads.yaml``); each random setting then draws as many.
    """

    k: int = 4
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mode: Literal["zero", "mean"] = "zero"
    max_new_tokens: int = 16
    batch_size: int = 16
    reference_size: int = 128
    judge: RefusalJudge | None = None
    heads: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.heads is not None:
            if not self.heads or any(len(pair) != 2 for pair in self.heads):
                raise AblationError(f"ablate.heads must be a non-empty list of [layer, head] pairs, got {self.heads}")
            self.heads = [[int(layer), int(head)] for layer, head in self.heads]
            self.k = len(self.heads)
        if self.k < 1:
            raise AblationError(f"ablate.k must be at least 1, got {self.k}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise AblationError(f"ablate.seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.reference_size < 1:
            raise AblationError("ablate.max_new_tokens, batch_size and reference_size must be at least 1")


def random_heads(candidates: Sequence[tuple[int, int]], exclude: Sequence[tuple[int, int]], k: int,
                 seed: int) -> list[tuple[int, int]]:
    """``k`` heads drawn with ``seed`` from ``candidates`` minus ``exclude``, sorted."""
    excluded = {tuple(pair) for pair in exclude}
    pool = sorted({tuple(pair) for pair in candidates} - excluded)
    if len(pool) < k:
        raise AblationError(f"the random control needs {k} heads outside the top {len(excluded)}, but only "
                         f"{len(pool)} candidates remain; lower k or rank more layers")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return sorted(pool[int(i)] for i in order[:k])


def ablation_plan(top: Sequence[tuple[int, int]], candidates: Sequence[tuple[int, int]],
                  settings: AblationSettings) -> list[AblationSetting]:
    """No ablation, the top-k heads, and one random draw of k non-top heads per seed."""
    top = [tuple(pair) for pair in top[:settings.k]]
    if len(top) < settings.k:
        raise AblationError(f"the ranking holds {len(top)} heads, fewer than ablate.k={settings.k}: lower ablate.k")
    plan = [AblationSetting("none", "none", []), AblationSetting(f"top{settings.k}", "top", sorted(top))]
    plan += [AblationSetting(f"random{settings.k}-seed{seed}", "random",
                             random_heads(candidates, top, settings.k, seed), seed) for seed in settings.seeds]
    return plan


def split_prompts(prompts: datasets.Dataset, test_ids: Sequence[str], train_ids: Sequence[str],
                  reference_size: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The run's test prompts, and the first ``reference_size`` benign training prompts (the mean's reference)."""
    position = {pid: i for i, pid in enumerate(prompts["id"])}
    missing = [pid for pid in [*test_ids, *train_ids] if pid not in position]
    if missing:
        raise AblationError(f"{len(missing)} cached prompts (e.g. {missing[0]!r}) are not in the configured prompt set; "
                         "the cache was made from another set: rebuild it (`sahs extract`)")
    labels = prompts["label"]
    benign = [position[pid] for pid in train_ids if labels[position[pid]] == 0][:reference_size]
    return prompts.select([position[pid] for pid in test_ids]), prompts.select(benign)


def run_ablation(model: PreTrainedModel, processor: Any, prompts: datasets.Dataset,
                 plan: Sequence[AblationSetting], settings: AblationSettings, *,
                 reference: datasets.Dataset | None = None,
                 progress: Callable[[str], None] = lambda line: None) -> AblationResult:
    """Generate an answer to every prompt under every setting of ``plan`` and judge it.

    ``prompts`` follow the prompt-set schema (``id, text, image, label, attack``); ``reference`` holds
    the benign prompts whose per-head means ``mean`` ablation writes.
    """
    adapter = find_adapter(model)
    for setting in plan:
        check_heads(adapter, setting.heads)
    means = None
    if settings.mode == "mean":
        if reference is None or len(reference) == 0:
            raise AblationError("mean ablation needs benign reference prompts: the training split has none")
        progress(f"per-head means over {len(reference)} benign reference prompts")
        means = head_means(model, processor, adapter, reference["text"], reference["image"], settings.batch_size)
    texts, images = prompts["text"], prompts["image"]
    answers: dict[str, list[str]] = {}
    for setting in plan:
        progress(f"{setting.name}: {len(texts)} answers with heads {setting.label()} ablated ({settings.mode})")
        with ablated_heads(adapter, setting.heads, settings.mode, means):
            answers[setting.name] = generate_answers(model, processor, texts, images,
                                                     max_new_tokens=settings.max_new_tokens,
                                                     batch_size=settings.batch_size)
    judge = settings.judge or PhraseJudge()
    verdicts = {name: judge(batch, texts) for name, batch in answers.items()}
    rows = {"id": prompts["id"], "attack": prompts["attack"], "label": prompts["label"], "prompt": texts}
    return AblationResult.from_answers(list(plan), rows, answers, verdicts, settings.mode)
