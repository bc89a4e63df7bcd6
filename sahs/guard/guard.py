"""``SafetyGuard``: score each prompt at its first generated token, inside generation, and refuse risky ones.

Hooks on the attention output projections of the detector's layers read the selected heads at the last
prompt position during the prefill forward that ``generate`` runs anyway. Right after that forward a
stopping criterion scores every row: a flagged row stops there and its answer is the refusal; the
others keep decoding from the same KV cache, token for token what plain ``generate`` would produce.
A guard fails closed: a row whose score is not a finite number is flagged, and its result says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from sahs.data.cache import fingerprint_diff
from sahs.data.selection import model_name
from sahs.errors import UserError
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import ModelConfig, load_model, model_identity
from sahs.models.artifact import DetectorArtifact

DEFAULT_REFUSAL = "I can't help with that request."
Prompt = str | dict[str, Any]
"""A prompt: its text, or ``{"text": ..., "image": PIL image | path | None}``."""


class DetectorMismatchError(ValueError):
    """The detector was trained on another model (or another head layout) than the one being guarded."""


class GuardSettingError(UserError, ValueError):
    """A guard option that cannot work (a batch of no prompts, no token to generate, a threshold not a number)."""


def check_options(batch_size: int, max_new_tokens: int, threshold: float | None) -> None:
    """Refuse options that would fail deep inside generation, or let every prompt through, before any model loads."""
    if type(batch_size) is not int or batch_size < 1:
        raise GuardSettingError(f"batch_size must be at least 1 (prompts per generate call), got {batch_size}")
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise GuardSettingError(f"max_new_tokens must be at least 1 (the guard decides at the first token), "
                                f"got {max_new_tokens}")
    if threshold is not None and not (isinstance(threshold, int | float) and math.isfinite(threshold)):
        raise GuardSettingError(f"threshold must be a finite number (scores are probabilities in [0, 1]), "
                                f"got {threshold}")


@dataclass
class GuardResult:
    """One prompt's outcome: detector score, whether it was refused, and the answer given."""

    score: float
    flagged: bool
    answer: str
    token_ids: list[int]
    """The generated tokens up to the first end-of-sequence token (empty for a refused prompt)."""
    error: str | None = None
    """Why the prompt was refused without a usable score (the detector gave NaN or inf), else None."""

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: a score that is not finite is written as null, beside the error."""
        out = {"score": self.score if math.isfinite(self.score) else None, "flagged": self.flagged,
               "answer": self.answer}
        return out | ({"error": self.error} if self.error else {})


class _FirstTokenDecision(StoppingCriteria):
    """Called by ``generate`` after each step; the first call follows the prefill, whose heads it scores."""

    def __init__(self, guard: SafetyGuard, capture: HeadCapture) -> None:
        self.guard, self.capture = guard, capture
        self.scores: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.flagged is None:
            activations = self.capture.collect()
            self.capture.remove()  # decoding runs without hooks
            self.scores = self.guard.score_activations(activations)
            # Fail closed: a NaN or infinite score (a NaN feature, an overflow) flags the prompt.
            self.flagged = (self.scores >= self.guard.threshold) | ~torch.isfinite(self.scores)
        return self.flagged.to(input_ids.device)


# What the guard's hooks read; a detector trained on other activations cannot be served by them.
READS = {"hook": "o_proj_input", "position": "last_prompt_token"}


def check_model(detector: DetectorArtifact, identity: dict[str, Any]) -> None:
    """Refuse a model whose identity (name, revision, config hash, dtype, ...) is not the detector's, and a
    detector trained on activations other than the ones the guard reads."""
    selection = detector.features
    extraction = selection.fingerprint.get("extraction") or {}
    other = {key: extraction[key] for key in READS if key in extraction and extraction[key] != READS[key]}
    if other:
        raise DetectorMismatchError(f"this detector was trained on activations {other}; the guard reads {READS}")
    changed = fingerprint_diff(selection.model, dict(identity))
    if changed:
        raise DetectorMismatchError(
            f"this detector was trained on {model_name(selection.fingerprint)} but the guarded model is "
            f"{model_name({'model': identity})} (differs: {', '.join(f'model.{key}' for key in changed)}): "
            "guard the model the detector was trained on, or train and export a detector for this one")


def model_config_for(detector: DetectorArtifact, model: str | ModelConfig | None = None,
                     **overrides: Any) -> ModelConfig:
    """How to load the model a detector was trained on: name, revision, dtype (and seed) from its fingerprint.

    ``model`` replaces the name (a different model is then refused by the fingerprint check); ``overrides``
    set other ``ModelConfig`` fields such as ``device``.
    """
    if isinstance(model, ModelConfig):
        return dataclasses.replace(model, **overrides)
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    stored = {key: value for key, value in detector.features.model.items() if key in fields}
    if model is not None:
        stored["name"] = model
    if "name" not in stored:
        raise ValueError("the detector's fingerprint names no model: pass the model to guard explicitly")
    return ModelConfig(**{**stored, **overrides})


class SafetyGuard:
    """A vision-language model, its processor and an exported detector, screening prompts as they generate.

    ``generate(prompts)`` returns one ``GuardResult`` per prompt; prompts are batched (``batch_size``)
    and decided one by one. Text-only and image prompts both work.
    """

    def __init__(self, model: PreTrainedModel, processor: Any, detector: DetectorArtifact,
                 model_identity: dict[str, Any], *, refusal: str = DEFAULT_REFUSAL, threshold: float | None = None,
                 max_new_tokens: int = 128, batch_size: int = 8) -> None:
        """
        Args:
            model: The loaded model (eval mode); generation runs through its own ``generate``.
            processor: Its processor (or tokenizer for a text-only model), as ``sahs.extract.models.load_model`` gives.
            detector: The exported detector (``DetectorArtifact.load(folder)``).
            model_identity: What ``sahs.extract.models.model_identity`` says of ``model``'s config; it must equal
                the detector's recorded model, or the guard refuses to start.
            refusal: The answer given to a flagged prompt.
            threshold: Flag at this score instead of the detector's own (chosen on validation).
            max_new_tokens: Default generation length.
            batch_size: Prompts per ``generate`` call.
        """
        check_options(batch_size, max_new_tokens, threshold)
        check_model(detector, model_identity)
        selection = detector.features
        self.adapter = find_adapter(model)
        layout = self.adapter.layout.as_dict()
        stored = {key: selection.layout.get(key) for key in layout}
        if stored != layout:
            raise DetectorMismatchError(f"the detector expects heads laid out as {stored} but the model has {layout}")
        if not hasattr(model, "generate"):
            raise DetectorMismatchError(f"{type(model).__name__} cannot generate: the guard wraps generative models")
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.detector = detector.to(self.device)
        self.selection = selection
        self.refusal, self.max_new_tokens, self.batch_size = refusal, max_new_tokens, batch_size
        self.threshold = detector.threshold if threshold is None else float(threshold)
        # Each head's position in the capture's [layers * heads] axis, in the detector's feature order.
        row = {layer: i for i, layer in enumerate(selection.layers)}
        self._head_index = torch.tensor([row[layer] * layout["num_heads"] + head for layer, head in selection.heads],
                                        device=self.device)

    @classmethod
    def load(cls, detector: str | Path, model: str | ModelConfig | None = None, *, device: str | None = None,
             **options: Any) -> SafetyGuard:
        """Load an exported detector and the model it names (or ``model``), and check that they belong together."""
        check_options(options.get("batch_size", 8), options.get("max_new_tokens", 128), options.get("threshold"))
        artifact = DetectorArtifact.load(detector)
        config = model_config_for(artifact, model, **({"device": device} if device is not None else {}))
        identity = model_identity(config)
        check_model(artifact, identity)  # from the config alone, before loading any weights
        loaded, processor = load_model(config)
        return cls(loaded, processor, artifact, identity, **options)

    def score_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """Scores ``[batch]`` from captured ``[batch, layers, heads, head_dim]`` (the detector's layers)."""
        features = activations.flatten(1, 2).index_select(1, self._head_index.to(activations.device))
        return self.detector.score(features.flatten(1))

    def generate(self, prompts: Sequence[Prompt], **generate_kwargs: Any) -> list[GuardResult]:
        """Screen and answer every prompt; ``generate_kwargs`` go to the model's ``generate`` (greedy by default)."""
        results: list[GuardResult] = []
        for start in range(0, len(prompts), self.batch_size):
            results += self._generate_batch(prompts[start:start + self.batch_size], generate_kwargs)
        return results

    __call__ = generate

    @torch.inference_mode()
    def _generate_batch(self, prompts: Sequence[Prompt], generate_kwargs: dict[str, Any]) -> list[GuardResult]:
        texts, images = zip(*(_text_and_image(prompt) for prompt in prompts))
        inputs = encode_batch(self.processor, list(texts), list(images)).to(self.device)
        settings = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **generate_kwargs}
        if settings.get("prefill_chunk_size") or getattr(self.model.generation_config, "prefill_chunk_size", None):
            raise ValueError("the guard reads the heads in one prefill forward: unset prefill_chunk_size")
        with HeadCapture(self.adapter, self.selection.layers) as capture:
            decision = _FirstTokenDecision(self, capture)
            capture.arm(last_real_position(inputs["attention_mask"]))
            output = self.model.generate(**inputs, stopping_criteria=StoppingCriteriaList([decision]), **settings)
        if decision.scores is None:
            raise RuntimeError("generation ended before its first token: ask for max_new_tokens >= 1")
        sequences = getattr(output, "sequences", output)[:, inputs["input_ids"].shape[1]:]
        results = []
        for score, flagged, tokens in zip(decision.scores.tolist(), decision.flagged.tolist(), sequences.tolist()):
            tokens = [] if flagged else self._until_end(tokens)
            answer = self.refusal if flagged else self.processor.decode(tokens, skip_special_tokens=True)
            error = None if math.isfinite(score) else f"the detector's score is {score}: refused (fail closed)"
            results.append(GuardResult(score, flagged, answer, tokens, error))
        return results

    def _until_end(self, tokens: list[int]) -> list[int]:
        """Generated tokens up to and including the first end-of-sequence token (the rest is batch padding)."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        return tokens[:end]


def _text_and_image(prompt: Prompt) -> tuple[str, Image.Image | None]:
    if isinstance(prompt, str):
        return prompt, None
    if "text" not in prompt:
        raise ValueError(f"a prompt needs a 'text' field, got the fields {sorted(prompt)}")
    image = prompt.get("image")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"prompt image {image} does not exist")
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    return prompt["text"], image
