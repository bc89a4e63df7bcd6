"""Turning prompt records into one padded model batch that ends where the answer begins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from PIL import Image
from transformers import BatchEncoding


# Tokenizers without a declared limit report a huge sentinel length; only real limits truncate.
MAX_DECLARED_LENGTH = 1_000_000


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def is_multimodal(processor: Any) -> bool:
    return hasattr(processor, "image_processor")


def _template_owner(processor: Any) -> Any | None:
    """The processor or tokenizer that carries a chat template, or None (encoders, base LMs)."""
    for owner in (processor, _tokenizer(processor)):
        if getattr(owner, "chat_template", None):
            return owner
    return None


def format_prompt(processor: Any, text: str, has_image: bool) -> str:
    """The prompt as the model sees it: its own chat template, ending at the assistant's turn."""
    owner = _template_owner(processor)
    if owner is None:
        return text
    if is_multimodal(owner):  # processor templates take typed content parts
        content: Any = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    else:
        content = text
    messages = [{"role": "user", "content": content}]
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_batch(processor: Any, texts: Sequence[str], images: Sequence[Image.Image | None],
                 padding_side: Literal["left", "right"] | None = None) -> BatchEncoding:
    """Tokenize a padded batch, with images through the model's own processor.

    Padding goes on ``padding_side``, by default the tokenizer's own, which ``load_model`` sets: left for
    decoders (as for generation), right for encoders, whose absolute position embeddings left padding
    would shift. The read position comes from the attention mask: the last real token on either side.
    """
    tokenizer = _tokenizer(processor)
    if tokenizer.pad_token is None:  # decoder-only LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    has_image = [image is not None for image in images]
    if any(has_image) and not is_multimodal(processor):
        raise ValueError("this batch has images but the model is text-only: keep text-only prompts for it "
                         "(e.g. filter the prompt set to the `text` attack family)")
    prompts = [format_prompt(processor, text, flag) for text, flag in zip(texts, has_image)]
    # A chat template writes the special tokens itself; raw text (encoders) needs the tokenizer's.
    # Passed on every call: some processors (InternVL, Aya Vision) would otherwise force their own side.
    kwargs: dict[str, Any] = {"padding": True, "padding_side": padding_side or tokenizer.padding_side,
                              "return_tensors": "pt", "add_special_tokens": _template_owner(processor) is None}
    if tokenizer.model_max_length <= MAX_DECLARED_LENGTH:
        # Over-long prompts (jailbreak templates on 512-token encoders) keep their end: the request
        # and the read position are there.
        kwargs.update(truncation=True, max_length=tokenizer.model_max_length)
        tokenizer.truncation_side = "left"
    if is_multimodal(processor):
        # One list of images per prompt, empty for text-only prompts: every processor reads this layout.
        pictures = [[image.convert("RGB")] if image is not None else [] for image in images]
        return processor(text=prompts, images=pictures if any(has_image) else None, **kwargs)
    return tokenizer(prompts, **kwargs)
