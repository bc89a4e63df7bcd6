"""Where each model family keeps its language-model layers and attention output projections.

This is the only place that knows transformers' module paths. Most families are found by
introspection (the decoder from ``get_decoder()``, the one ``nn.ModuleList`` of
``num_hidden_layers`` blocks in it, the output projection by its usual name); the table below holds
the exceptions. To add a family, build its real class from a tiny config and, if introspection fails,
add its ``model_type`` to ``OUT_PROJ_NAMES`` (and, if needed, ``LAYER_LIST_NAMES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

# Output projection of the attention block, relative to one layer, by how common it is.
DEFAULT_OUT_PROJ_NAMES = ("self_attn.o_proj", "self_attn.out_proj", "attention.output.dense", "attn.o_proj")
# model_type -> the out projection relative to one layer, where introspection would pick wrongly.
OUT_PROJ_NAMES: dict[str, str] = {
    "bert": "attention.output.dense",
    "distilbert": "attention.out_lin",
    "mpnet": "attention.attn.o",
}
# model_type -> the path of the layer list relative to the decoder, where introspection is ambiguous.
LAYER_LIST_NAMES: dict[str, str] = {
    "bert": "encoder.layer",
}


class UnsupportedModelError(ValueError):
    """Raised for a model whose attention output projections cannot be located."""


@dataclass(frozen=True)
class HeadLayout:
    """Shape of one prompt's activations: ``[num_layers, num_heads, head_dim]``."""

    num_layers: int
    num_heads: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim}


@dataclass(frozen=True)
class ModelAdapter:
    """The attention output projection of every language-model layer, in layer order."""

    family: str
    out_projs: tuple[nn.Module, ...]
    layout: HeadLayout


def _text_config(model: PreTrainedModel) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unsupported(model: PreTrainedModel, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot locate the attention heads of {type(model).__name__} "
        f"(model_type={model.config.model_type!r}): {why}. To add it, set its attention output "
        f"projection in sahs.extract.adapters.OUT_PROJ_NAMES (and the layer list in LAYER_LIST_NAMES) "
        f"and pin it with a tiny-config builder in tests/families.py."
    )


def _layer_list(model: PreTrainedModel, num_layers: int) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    family = model.config.model_type
    if family in LAYER_LIST_NAMES:
        return decoder.get_submodule(LAYER_LIST_NAMES[family])
    candidates = [
        (name, module) for name, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(candidates) != 1:
        names = [name for name, _ in candidates] or "none"
        raise _unsupported(model, f"expected one list of {num_layers} layers in the decoder, found {names}")
    return candidates[0][1]


def _out_proj(model: PreTrainedModel, layer: nn.Module) -> nn.Module:
    family = model.config.model_type
    names = (OUT_PROJ_NAMES[family],) if family in OUT_PROJ_NAMES else DEFAULT_OUT_PROJ_NAMES
    for name in names:
        try:
            return layer.get_submodule(name)
        except AttributeError:
            continue
    raise _unsupported(model, f"no attention output projection among {list(names)}")


def find_adapter(model: PreTrainedModel) -> ModelAdapter:
    """Locate the per-layer attention output projections of ``model``'s language model."""
    text_config = _text_config(model)
    num_layers = text_config.num_hidden_layers
    layers = _layer_list(model, num_layers)
    out_projs = tuple(_out_proj(model, layer) for layer in layers)
    # Heads are the query heads: under grouped-query attention o_proj still sees num_attention_heads,
    # and head_dim comes from o_proj's width since it need not be hidden_size / heads (Gemma).
    num_heads = getattr(text_config, "num_attention_heads", None)
    if not isinstance(num_heads, int):
        raise _unsupported(model, "its text config has no num_attention_heads")
    widths = sorted({getattr(out_proj, "in_features", None) for out_proj in out_projs}, key=str)
    if len(widths) != 1 or not isinstance(widths[0], int) or widths[0] % num_heads:
        raise _unsupported(model, f"o_proj input widths {widths} are not one multiple of {num_heads} heads")
    layout = HeadLayout(num_layers, num_heads, widths[0] // num_heads)
    return ModelAdapter(model.config.model_type, out_projs, layout)
