"""Tuning a tiny LLaVA to refuse malicious requests: the recipe, the tuning rows, the tokenizer, the loop.

The model learns two answers: ``REFUSAL`` for malicious requests and ``COMPLIANCE`` for benign ones,
from the reserved requests of ``sahs.prompts.tuning`` rendered by the tuned attack families only.
A byte-level BPE tokenizer trained on the tuning prompts keeps sequences short. Everything is a pure
function of the recipe: the weights come out the same in any process (one thread, seeded generators).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from sahs.extract.formatting import format_prompt
from sahs.extract.tiny import SPECIAL_TOKENS, tiny_llava_config, tiny_llava_processor
from sahs.prompts.attacks import FIGSTEP_PROMPT, ROLE_PLAY_FRAMES, TYPO_PROMPT, build_attacks
from sahs.prompts.benign import benign_requests
from sahs.prompts.seeds import harmful_seeds, jailbreak_templates
from sahs.prompts.tuning import tuning_benign, tuning_malicious

REFUSAL = "I'm sorry, but I cannot help with that."
COMPLIANCE = "Sure, here is a helpful answer."
TEXT_FAMILIES = ("text", "rephrase", "template")  # families that render a request without an image
PAD_ID = SPECIAL_TOKENS.index("<pad>")
EOS_ID = SPECIAL_TOKENS.index("</s>")


@dataclass(frozen=True)
class TuningRecipe:
    """Everything that decides the organism's weights; its JSON is part of the organism's fingerprint."""

    seed: int = 0
    """Seed of the weight init, the rendering choices and the batch order."""
    tuned_families: tuple[str, ...] = ("text", "rephrase")
    """Attack families the tuning rows are rendered in (text-only ones; the others stay untuned)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 0.01
    token_noise: float = 0.15
    """Share of prompt tokens replaced by random ones in each batch, so unseen words do not sway the answer."""
    crop: float = 0.5
    """Share of rows whose request is cut to a random span of at least half its tokens."""
    malicious_weight: float = 0.55
    """Share of malicious rows in the batches."""
    malicious_renderings: int = 2
    """Renderings of each malicious request in families that choose a wording (rephrase, template)."""
    vocab_size: int = 4000
    text_layers: int = 4
    text_heads: int = 4
    kv_heads: int = 2
    hidden: int = 64
    card_requests: int = 100
    """Held-out requests per label and family for the card's refusal rates."""

    def __post_init__(self) -> None:
        untunable = sorted(set(self.tuned_families) - set(TEXT_FAMILIES))
        if untunable or not self.tuned_families:
            raise ValueError(f"tuned_families must be a non-empty subset of {list(TEXT_FAMILIES)} (families that "
                             f"carry the request as text); got {list(self.tuned_families)}")

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "tuned_families": list(self.tuned_families)}


@dataclass(frozen=True)
class TuningRow:
    """One tuning prompt: the rendered text, its label, its family and the request it renders."""

    text: str
    label: int
    attack: str
    request: str


def tuning_rows(recipe: TuningRecipe, seed_cache: str | None = None) -> list[TuningRow]:
    """The reserved requests rendered in the tuned families (malicious ones in several wordings)."""
    attacks = build_attacks(list(recipe.tuned_families), cache_dir=seed_cache)
    rows = []
    for label, seeds in ((0, tuning_benign()), (1, tuning_malicious(seed_cache))):
        for seed in seeds:
            for family, attack in attacks.items():
                renderings = recipe.malicious_renderings if label and family != "text" else 1
                for k in range(renderings):
                    rng = random.Random(f"{recipe.seed}/{family}/{k}/{seed.text}")
                    rows.append(TuningRow(attack.apply(seed.text, rng).text, label, family, seed.text))
    return rows


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the tiny LLaVA's special tokens first (so ``<pad>`` is 3 and ``<image>`` 4)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens(SPECIAL_TOKENS)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", padding_side="left")
    tokenizer.image_token = "<image>"
    return tokenizer


def tokenizer_corpus(rows: list[TuningRow], seed_cache: str | None = None) -> list[str]:
    """What the tokenizer learns from: the project's prompt texts without labels (tuning prompts, every
    benign request and harmful seed, the attack families' fixed texts) and the two answers.

    A word of an evaluation request then is one token whose embedding tuning never moved; token noise in
    tuning teaches the model to ignore such tokens. (Without them, unseen words split into pieces that
    the model had only seen in tuning words, which sway its answer far more.)
    """
    requests = [s.text for s in benign_requests()] + [s.text for s in harmful_seeds(cache_dir=seed_cache)]
    fixed = [FIGSTEP_PROMPT, TYPO_PROMPT, *ROLE_PLAY_FRAMES, *(t.text for t in jailbreak_templates(seed_cache))]
    return [row.text for row in rows] + requests + fixed + ["USER: ASSISTANT:", REFUSAL, COMPLIANCE]


def organism_config(recipe: TuningRecipe, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    return tiny_llava_config(text_layers=recipe.text_layers, text_heads=recipe.text_heads, kv_heads=recipe.kv_heads,
                             hidden=recipe.hidden, vocab_size=len(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def init_model(config: LlavaConfig, seed: int) -> LlavaForConditionalGeneration:
    """Fresh weights from ``seed``, leaving the global generator as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)


class _Batches:
    """Seeded batches of (prompt ids, answer ids), with token noise and crops; lengths kept close to cut padding."""

    def __init__(self, encoded: list[tuple[torch.Tensor, torch.Tensor, int]], recipe: TuningRecipe,
                 vocab_size: int, chat_tokens: tuple[int, int]) -> None:
        self.encoded, self.recipe, self.vocab_size = encoded, recipe, vocab_size
        self.prefix, self.suffix = chat_tokens  # tokens of "USER:" and " ASSISTANT:" around each request
        labels = torch.tensor([label for *_, label in encoded])
        malicious = labels.sum().clamp(min=1)
        benign = (1 - labels).sum().clamp(min=1)
        self.weights = torch.where(labels == 1, recipe.malicious_weight / malicious,
                                   (1 - recipe.malicious_weight) / benign)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.queue: list[list[int]] = []

    def _augment(self, prompt: torch.Tensor) -> torch.Tensor:
        g, recipe = self.generator, self.recipe
        body = prompt[self.prefix:len(prompt) - self.suffix]
        if len(body) > 6 and torch.rand(1, generator=g).item() < recipe.crop:
            keep = max(4, int(len(body) * (0.5 + 0.5 * torch.rand(1, generator=g).item())))
            start = int(torch.randint(0, len(body) - keep + 1, (1,), generator=g))
            prompt = torch.cat([prompt[:self.prefix], body[start:start + keep], prompt[len(prompt) - self.suffix:]])
        flip = torch.rand(len(prompt), generator=g) < recipe.token_noise
        noise = torch.randint(len(SPECIAL_TOKENS), self.vocab_size, (len(prompt),), generator=g)
        return torch.where(flip, noise, prompt)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)``, each ``[batch, length]``, padded on the left."""
        size = self.recipe.batch_size
        if not self.queue:  # draw four batches at once and group them by length
            drawn = torch.multinomial(self.weights, 4 * size, replacement=True, generator=self.generator).tolist()
            drawn.sort(key=lambda i: len(self.encoded[i][0]))
            order = torch.randperm(4, generator=self.generator).tolist()
            self.queue = [drawn[k * size:(k + 1) * size] for k in order]
        rows = [(self._augment(self.encoded[i][0]), self.encoded[i][1]) for i in self.queue.pop()]
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((size, length), PAD_ID)
        mask = torch.zeros((size, length), dtype=torch.long)
        labels = torch.full((size, length), -100)
        for j, (prompt, answer) in enumerate(rows):
            sequence = torch.cat([prompt, answer])
            ids[j, length - len(sequence):] = sequence
            mask[j, length - len(sequence):] = 1
            labels[j, length - len(answer):] = answer
        return ids, mask, labels


def tune(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, rows: list[TuningRow],
         recipe: TuningRecipe, log: Callable[[str], None] = lambda line: None) -> list[float]:
    """Train ``model`` in place to answer each row with ``REFUSAL`` or ``COMPLIANCE``; returns the losses.

    The loss covers the answer tokens only; logits are computed at those positions alone.
    """
    processor = tiny_llava_processor(model.config, tokenizer)
    answers = {label: torch.tensor(tokenizer(" " + text, add_special_tokens=False).input_ids + [EOS_ID])
               for label, text in ((0, COMPLIANCE), (1, REFUSAL))}
    encoded = [(torch.tensor(tokenizer(format_prompt(processor, row.text, False), add_special_tokens=False).input_ids),
                answers[row.label], row.label) for row in rows]
    chat = (len(tokenizer("USER:", add_special_tokens=False).input_ids),
            len(tokenizer(" ASSISTANT:", add_special_tokens=False).input_ids))
    batches = _Batches(encoded, recipe, len(tokenizer), chat)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(recipe.steps):
        ids, mask, labels = batches.next()
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, length, hidden]
        answer = labels[:, 1:] != -100  # position t predicts token t + 1
        loss = F.cross_entropy(model.lm_head(hidden[:, :-1][answer]), labels[:, 1:][answer])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"step {step + 1}/{recipe.steps}  loss={loss.item():.4f}  ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return losses
