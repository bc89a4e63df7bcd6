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


# Where a decoder keeps its final norm, relative to ``get_decoder()``: read by path patching only.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm between the last layer's residual stream and the unembedding."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise AblationError(f"path patching needs the final norm of {type(model).__name__}'s decoder, looked for "
                        f"{list(FINAL_NORM_NAMES)}: add its name to sahs.extract.interventions.FINAL_NORM_NAMES")


@contextmanager
def recorded_heads(adapter: ModelAdapter, layers: Sequence[int], norm: nn.Module | None = None
                   ) -> Iterator[dict[int | str, torch.Tensor]]:
    """While active, every forward stores each layer's ``o_proj`` input at every position under its layer
    (``[batch, pos, heads * head_dim]``) and, with ``norm``, the final norm's input under ``"resid"``."""
    seen: dict[int | str, torch.Tensor] = {}

    def keep(key: int | str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[key] = args[0].detach()
        return hook

    hooks = {adapter.out_projs[layer]: keep(layer) for layer in layers}
    if norm is not None:
        hooks[norm] = keep("resid")
    with forward_pre_hooks(hooks):
        yield seen


@contextmanager
def patched_head(adapter: ModelAdapter, layer: int, head: int, source: torch.Tensor,
                 positions: torch.Tensor) -> Iterator[None]:
    """While active, head ``(layer, head)``'s slice of ``o_proj``'s input takes ``source``'s values where
    ``positions`` is set. ``source`` is ``[batch, pos, heads * head_dim]``, ``positions`` ``[batch, pos]``
    (bool), both shaped like the patched forward; a forward of another length (a cached generation step,
    one new position) passes untouched, so under ``generate`` only the prompt is patched."""
    check_heads(adapter, [(layer, head)])
    width = adapter.layout.head_dim
    inside = slice(head * width, (head + 1) * width)
    where = positions.bool().unsqueeze(-1)  # [batch, pos, 1]
    patch = source[..., inside]

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        z = args[0]  # [batch, pos, heads * head_dim]
        if z.shape[:2] != where.shape[:2]:
            return None
        z = z.clone()
        z[..., inside] = torch.where(where.to(z.device), patch.to(device=z.device, dtype=z.dtype), z[..., inside])
        return (z, *args[1:])

    with forward_pre_hooks({adapter.out_projs[layer]: hook}):
        yield
