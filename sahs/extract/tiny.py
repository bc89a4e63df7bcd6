"""The embedded tiny LLaVA: the real transformers classes, random weights, built offline.

It exists so that the whole pipeline (chat template, image processor, prefill, hooks, cache, detector)
runs on a CPU with nothing from the hub. Weights are a pure function of ``seed``.
"""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers picks the PIL image processor when torchvision is absent; ask for it directly
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

TINY_LLAVA = "sahs/tiny-llava"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), written as a chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_llava_config(
    text_layers: int = 4,
    text_heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 256 + len(SPECIAL_TOKENS),
    image_token_id: int = 256 + SPECIAL_TOKENS.index("<image>"),
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config (CLIP vision tower, Llama text model with grouped-query attention).

    The vocabulary defaults to the byte-level tokenizer's; a trained tokenizer passes its own size and image id.
    """
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=kv_heads,
        vocab_size=vocab_size, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is a token, so it needs no training and no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", padding_side="left",
    )
    tokenizer.image_token = "<image>"
    return tokenizer


def tiny_llava_processor(config: LlavaConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """The processor for ``config``, with the byte-level tokenizer unless another one is given."""
    size = config.vision_config.image_size
    image_processor = _CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or tiny_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE, image_token="<image>",
    )


def build_tiny_llava(seed: int = 0, **config_overrides: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Model and processor; the same seed gives the same weights in any process."""
    config = tiny_llava_config(**config_overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tiny_llava_processor(config)


def config_hash_source(config: LlavaConfig) -> str:
    """The config as canonical JSON, the input of the cache fingerprint."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
