"""Prompt sets built here: harmful seeds and our benign requests, each rendered by attack families.

Every family gets both labels in equal measure, so leave-one-attack-out folds are balanced and no
family gives the label away. By default each request is used by one family only, so no request
text is shared between a held-out family and the families a detector was trained on. Every row's
``group`` names its request, so with ``share_seeds`` the renderings of one request share a group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import datasets

from sahs.prompts.attacks import ATTACK_FAMILIES, build_attacks
from sahs.prompts.benign import benign_requests
from sahs.prompts.identity import RowHasher, describe, rows_digest
from sahs.prompts.render import font_identity
from sahs.prompts.schema import FEATURES, PromptSource, Provenance, make_dataset
from sahs.prompts.seeds import DONOTANSWER_AREAS, SEED_SOURCES, Seed, harmful_seeds, jailbreak_templates, normalise
from sahs.prompts.tuning import evaluation_seeds

AttackName = Literal["text", "figstep", "typo", "template", "rephrase"]
SeedSource = Literal["strongreject", "harmbench", "donotanswer"]


@dataclass(frozen=True)
class PlannedRow:
    """One row before rendering: its id, family, label, the request it starts from and that request's group."""

    id: str
    attack: str
    label: int
    seed: Seed
    group: str


def request_group(prefix: str, label: int, request: str) -> str:
    """The group of a request: the same text (up to case and spacing) in any family gives the same group."""
    digest = hashlib.sha256(normalise(request).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{('ben', 'mal')[label]}-{digest}"


def split_among(pool: list[Seed], n: int, k: int, share: bool, rng: random.Random, what: str) -> list[list[Seed]]:
    """Draw requests for ``k`` families, ``n`` rows in all (sizes differ by at most one).

    With ``share`` every family draws from the same requests; otherwise the families are disjoint.
    """
    if n < k:
        raise ValueError(f"{what}: {n} rows cannot cover {k} attack families (each needs both labels)")
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    need = sizes[0] if share else n
    if need > len(pool):
        raise ValueError(f"{what}: {need} distinct requests needed but only {len(pool)} are available")
    drawn = rng.sample(pool, need)
    if share:
        return [drawn[:size] for size in sizes]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [drawn[start : start + size] for start, size in zip(starts, sizes)]


class AttackSet(PromptSource):
    """Base of the built-in sets; subclasses fix the id prefix and the defaults."""

    prefix: ClassVar[str] = "set"

    def __init__(
        self,
        *,
        n_benign: int,
        n_malicious: int,
        attacks: list[AttackName],
        seed: int,
        image_size: int | None,
        cache_dir: str | None,
        share_seeds: bool = False,
        seed_sources: list[SeedSource] = list(SEED_SOURCES),
        assistant_name: str = "Assistant",
    ) -> None:
        """Keyword-only; the subclasses document each argument and choose the defaults."""
        unknown = sorted(set(attacks) - set(ATTACK_FAMILIES))
        if unknown or not attacks:
            raise ValueError(f"attacks must be a non-empty subset of {list(ATTACK_FAMILIES)}; got {attacks}")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks lists a family twice: {attacks}")
        self.n_benign = n_benign
        self.n_malicious = n_malicious
        self.attacks = list(attacks)
        self.seed = seed
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.share_seeds = share_seeds
        self.seed_sources = list(seed_sources)
        self.assistant_name = assistant_name

    def plan(self) -> list[PlannedRow]:
        """Which request goes to which family and label, with readable stable ids; renders nothing."""
        k = len(self.attacks)
        # The requests reserved for tuning the model organism never enter an evaluation set.
        malicious = evaluation_seeds(harmful_seeds(self.seed_sources, self.cache_dir, DONOTANSWER_AREAS))
        pools = {
            0: split_among(benign_requests(), self.n_benign, k, self.share_seeds,
                           random.Random(f"{self.seed}/benign"), "benign requests"),
            1: split_among(malicious, self.n_malicious, k, self.share_seeds,
                           random.Random(f"{self.seed}/malicious"), "malicious requests"),
        }
        rows = []
        for f, attack in enumerate(self.attacks):
            for label, tag in ((0, "ben"), (1, "mal")):
                for i, seed in enumerate(pools[label][f]):
                    rows.append(PlannedRow(f"{self.prefix}-{attack}-{tag}-{i:04d}", attack, label, seed,
                                           request_group(self.prefix, label, seed.text)))
        return rows

    def _rng(self, row: PlannedRow) -> random.Random:
        return random.Random(f"{self.seed}/{row.id}")  # str seeds are hashed stably across processes

    def load(self) -> datasets.Dataset:
        attacks = build_attacks(self.attacks, self.image_size, self.cache_dir, self.assistant_name)
        records = []
        for row in self.plan():
            prompt = attacks[row.attack].apply(row.seed.text, self._rng(row))
            # Encoded at once, as the dataset stores it: a thousand drawn 760 px images would hold 1.7 GB.
            image = None if prompt.image is None else FEATURES["image"].encode_example(prompt.image)
            records.append(dict(id=row.id, text=prompt.text, image=image, label=row.label,
                                attack=row.attack, source=row.seed.source, category=row.seed.category,
                                group=row.group))
        return make_dataset(records)

    identity_ignores = ("cache_dir",)  # the seeds read there are hashed, in the plan

    def identity(self) -> dict[str, Any]:
        """The plan (every row's id, family, label, group and request), the templates, the font: no rendering."""
        plan = RowHasher()
        for row in self.plan():
            plan.add(dict(id=row.id, attack=row.attack, label=row.label, group=row.group, text=row.seed.text,
                          source=row.seed.source, category=row.seed.category))
        inputs: dict[str, Any] = {"plan": plan.hexdigest(), "rows": plan.count}
        if "template" in self.attacks:
            inputs["templates"] = rows_digest(dataclasses.asdict(t) for t in jailbreak_templates(self.cache_dir))
        if {"figstep", "typo"} & set(self.attacks):
            inputs["font"] = font_identity()
        return describe(self, inputs)

    def provenance(self) -> dict[str, Provenance]:
        # Only templates add third-party text; replaying their choice is cheap (nothing is rendered).
        template = build_attacks(["template"], None, self.cache_dir, self.assistant_name)["template"]
        result = {}
        for row in self.plan():
            licence, origin = row.seed.licence, row.seed.origin
            if row.attack == "template":
                added = template.apply(row.seed.text, self._rng(row))
                if added.origin:
                    licence, origin = f"{licence}; template: {added.licence}", f"{origin}; template: {added.origin}"
            result[row.id] = Provenance(licence, origin)
        return result


class DemoPrompts(AttackSet):
    """The small built-in set of the demo run: balanced over families and labels, loads in seconds."""

    prefix = "demo"

    def __init__(
        self,
        n_benign: int = 200,
        n_malicious: int = 200,
        attacks: list[AttackName] = ["text", "figstep", "template"],
        seed: int = 0,
        image_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            n_benign: Benign rows in all, spread evenly over the attack families.
            n_malicious: Malicious rows in all, spread evenly over the attack families.
            attacks: Attack families to render (at least one; each gets both labels).
            seed: Seed for drawing requests and for choices inside families (templates, wordings).
            image_size: Longer image side in pixels after downscaling (e.g. 224); None keeps full size.
            cache_dir: Folder for the seed wheels and parsed seeds; None uses $SAHS_CACHE/seeds or ~/.cache/sahs/seeds.
        """
        super().__init__(n_benign=n_benign, n_malicious=n_malicious, attacks=attacks, seed=seed,
                         image_size=image_size, cache_dir=cache_dir)


class OfflineAttackSet(AttackSet):
    """The full built-in set written by ``sahs data build``: all five families by default."""

    prefix = "offline"

    def __init__(
        self,
        n_benign: int = 1000,
        n_malicious: int = 1000,
        attacks: list[AttackName] = list(ATTACK_FAMILIES),
        seed: int = 0,
        image_size: int | None = None,
        cache_dir: str | None = None,
        share_seeds: bool = False,
        seed_sources: list[SeedSource] = list(SEED_SOURCES),
        assistant_name: str = "Assistant",
    ) -> None:
        """
        Args:
            n_benign: Benign rows in all, spread evenly over the attack families.
            n_malicious: Malicious rows in all, spread evenly over the attack families.
            attacks: Attack families to render (each gets both labels).
            seed: Seed for drawing requests and for choices inside families (templates, wordings).
            image_size: Longer image side in pixels after downscaling; None keeps full size (760 / 1024 px).
            cache_dir: Folder for the seed wheels and parsed seeds; None uses $SAHS_CACHE/seeds or ~/.cache/sahs/seeds.
            share_seeds: Render the same requests in every family (True) or give each family its own (False).
            seed_sources: Harmful sets to draw malicious requests from.
            assistant_name: Name put where jailbreak templates address the model.
        """
        super().__init__(n_benign=n_benign, n_malicious=n_malicious, attacks=attacks, seed=seed,
                         image_size=image_size, cache_dir=cache_dir, share_seeds=share_seeds,
                         seed_sources=seed_sources, assistant_name=assistant_name)
