"""Batched greedy generation from prompt records, formatted as for extraction (chat template, left padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from sahs.extract.formatting import encode_batch


def model_device(model: PreTrainedModel) -> torch.device:
    """Where inputs go: the model's own device (the first shard's under a ``device_map``)."""
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.inference_mode()
def generate_answers(model: PreTrainedModel, processor: Any, texts: Sequence[str],
                     images: Sequence[Image.Image | None] | None = None, *, max_new_tokens: int = 16,
                     batch_size: int = 16) -> list[str]:
    """The greedy answer to each prompt (new tokens only, special tokens dropped, whitespace stripped).

    Prompts are padded on the left, so every row's answer starts right after its last real token.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    images = list(images) if images is not None else [None] * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(images)} images")
    tokenizer = getattr(processor, "tokenizer", processor)
    device = model_device(model)
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        inputs = encode_batch(processor, texts[start:start + batch_size], images[start:start + batch_size],
                              padding_side="left").to(device)
        if "pixel_values" in inputs:  # the vision tower runs in the model's dtype (fp16 on GPU)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # [batch, <= max_new_tokens]
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
