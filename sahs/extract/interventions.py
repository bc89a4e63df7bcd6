"""Interventions on the live model: head ablation and activation patching, beside the capture hooks.

A head's output is its ``head_dim`` slice of the input to ``o_proj`` (TransformerLens' ``hook_z``);
after the projection the heads are mixed. Zero-ablation writes zeros there, mean-ablation the head's
mean over a benign reference set, at every position of the prompt and of every generated token.
The hooks live only inside the ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from sahs.errors import UserError
from sahs.extract.adapters import ModelAdapter
from sahs.extract.formatting import encode_batch
from sahs.extract.generation import model_device
from sahs.extract.hooks import forward_pre_hooks

AblationMode = Literal["zero", "mean"]


class AblationError(UserError, ValueError):
    """An ablation asked for heads, a mode or settings that cannot be: the message says what to change."""


def check_heads(adapter: ModelAdapter, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``heads`` as sorted unique ``(layer, head)`` pairs, or a clear error naming the first bad one."""
    layout = adapter.layout
    pairs = sorted({(int(layer), int(head)) for layer, head in heads})
    for layer, head in pairs:
        if not (0 <= layer < layout.num_layers and 0 <= head < layout.num_heads):
            raise AblationError(f"head ({layer}, {head}) does not exist: the model has {layout.num_layers} layers of "
                             f"{layout.num_heads} heads (layers and heads count from 0)")
    return pairs


def _replace(mask: torch.Tensor, fill: torch.Tensor):
    """A pre-hook putting ``fill`` where ``mask`` is set, on the last axis of ``o_proj``'s input."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        z = args[0]  # [batch, pos, heads * head_dim]
        replaced = torch.where(mask.to(z.device), fill.to(device=z.device, dtype=z.dtype), z)
        return (replaced, *args[1:])

    return hook


@contextmanager
def ablated_heads(adapter: ModelAdapter, heads: Sequence[tuple[int, int]], mode: AblationMode = "zero",
                  means: torch.Tensor | None = None) -> Iterator[list[tuple[int, int]]]:
    """While active, each ``(layer, head)`` in ``heads`` outputs zeros (``zero``) or ``means[layer, head]``
    (``mean``, ``means`` from ``head_means``) at every position. Yields the checked heads; no heads, no hooks."""
    if mode not in ("zero", "mean"):
        raise AblationError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    pairs = check_heads(adapter, heads)
    layout = adapter.layout
    if mode == "mean":
        expected = (layout.num_layers, layout.num_heads, layout.head_dim)
        if means is None or tuple(means.shape) != expected:
            got = None if means is None else tuple(means.shape)
            raise AblationError(f"mean ablation needs per-head means of shape {expected} (from head_means), got {got}")
    hooks = {}
    for layer in sorted({layer for layer, _ in pairs}):
        mask = torch.zeros(layout.num_heads, layout.head_dim, dtype=torch.bool)
        fill = torch.zeros(layout.num_heads, layout.head_dim)
        for head in (h for lay, h in pairs if lay == layer):
            mask[head] = True
            if mode == "mean":
                fill[head] = means[layer, head].float().cpu()
        hooks[adapter.out_projs[layer]] = _replace(mask.flatten(), fill.flatten())
    with forward_pre_hooks(hooks):
        yield pairs


@torch.inference_mode()
def head_means(model: PreTrainedModel, processor: Any, adapter: ModelAdapter, texts: Sequence[str],
               images: Sequence[Image.Image | None] | None = None, batch_size: int = 16) -> torch.Tensor:
    """Every head's mean ``o_proj`` input over all real positions of the reference prompts (the chat
    template and image tokens included, padding excluded): ``[layers, heads, head_dim]``, float32 on CPU."""
    if not texts:
        raise AblationError("mean ablation needs at least one benign reference prompt: raise reference_size or "
                            "use a prompt set with benign training prompts")
    images = list(images) if images is not None else [None] * len(texts)
    layout = adapter.layout
    sums = torch.zeros(layout.num_layers, layout.num_heads * layout.head_dim, dtype=torch.float64)
    count = 0
    mask_now: dict[str, torch.Tensor] = {}

    def accumulate(layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            z, mask = args[0], mask_now["mask"]  # [batch, pos, width], [batch, pos]
            if z.shape[:2] != mask.shape:
                raise RuntimeError(f"o_proj input has {tuple(z.shape[:2])} positions but the attention mask "
                                   f"{tuple(mask.shape)}: this model changes the sequence inside the forward")
            sums[layer] += (z.double() * mask.unsqueeze(-1)).sum(dim=(0, 1)).cpu()
        return hook

    device = model_device(model)
    with forward_pre_hooks({adapter.out_projs[layer]: accumulate(layer) for layer in range(layout.num_layers)}):
        for start in range(0, len(texts), batch_size):
            inputs = encode_batch(processor, texts[start:start + batch_size],
                                  images[start:start + batch_size]).to(device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            mask_now["mask"] = inputs["attention_mask"].to(dtype=torch.float64)
            count += int(inputs["attention_mask"].sum())
            model(**inputs, use_cache=False)
    return (sums / count).float().view(layout.num_layers, layout.num_heads, layout.head_dim)
