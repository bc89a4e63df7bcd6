"""Tiny random models of each supported family: real transformers classes, built offline in milliseconds.

Each builder returns a ``Tiny``: the model, its processor (or hand-built inputs), and where its layers
and attention blocks are (what the adapter must find). Tokenizers are
byte-level (every byte is a token) plus the family's special tokens, so nothing is trained or downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerFast

from sahs.extract.formatting import encode_batch

# (texts, images, padding_side) -> model inputs
Encode = Callable[[Sequence[str], Sequence[Image.Image | None], str | None], BatchEncoding]
BASE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# A generic chat template: "<s>User: <image slot>text\nAssistant:"; the slot is each family's own image text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}User: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}IMAGE_SLOT{% endif %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


@dataclass
class Tiny:
    """A tiny model, its input builder, and what the adapter should find in it."""

    model: PreTrainedModel
    processor: Any
    """The family's processor (or tokenizer) that ``encode_batch`` runs; None with ``hand_built``."""
    layers: str
    """Path of the language model's layer list, from the model's root."""
    num_heads: int = 4
    head_dim: int = 8
    out_proj: str = "self_attn.o_proj"
    """The attention output projection inside one layer."""
    attention: str = "self_attn"
    """The attention block inside one layer; its output is the projection of the captured heads."""
    context: bool = False
    """True where ``attention`` returns the heads themselves, before the projection (BERT)."""
    sep_token_id: int | None = None
    """The token an encoder input ends with, where its heads are read."""
    hand_built: Encode | None = None
    """Builds the inputs where the family's processor cannot run here."""

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None],
               padding_side: str | None = None) -> BatchEncoding:
        if self.hand_built is not None:
            return self.hand_built(texts, images, padding_side)
        return encode_batch(self.processor, texts, images, padding_side)


def byte_tokenizer(specials: Sequence[str] = (), chat_image: str | None = None, encoder: bool = False,
                   **named: str) -> PreTrainedTokenizerFast:
    """Bytes 0-255 as tokens, then ``BASE_SPECIALS + specials``; ``named`` become attributes (``image_token``).

    ``chat_image`` is the text a chat template writes for an image (None: no chat template).
    ``encoder`` gives BERT's ``[CLS] text [SEP]`` framing instead.
    """
    every = list(dict.fromkeys([*BASE_SPECIALS, *specials, *named.values()]))
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: 256 + i for i, tok in enumerate(every)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(every)
    if encoder:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="right" if encoder else "left", extra_special_tokens=named or None,
    )
    if chat_image is not None:
        tokenizer.chat_template = CHAT_TEMPLATE.replace("IMAGE_SLOT", chat_image)
    return tokenizer


def text_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> dict[str, Any]:
    """A tiny decoder whose vocabulary and special ids match ``tokenizer``."""
    return {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **overrides}


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def seeded(build: Callable[[], PreTrainedModel], seed: int = 0) -> PreTrainedModel:
    """Random weights that depend on ``seed`` only, without touching the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def without_video(processor_class: type) -> type:
    """The family's processor class minus its video processor, whose class needs torchvision.

    Images still go through the family's own image processor and token expansion; only the
    video slot (unused here) is left empty.
    """

    class ImageOnly(processor_class):
        def __init__(self, image_processor: Any, tokenizer: Any, **kwargs: Any):
            super().__init__(image_processor, tokenizer, None, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def text_lm(family: str) -> Tiny:
    """Decoder-only LLMs; Gemma's head_dim (16) is not hidden / heads (8)."""
    config_class, model_class, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    }[family]
    tokenizer = byte_tokenizer(chat_image="")
    config = config_class(**text_config(tokenizer, **extra))
    return Tiny(seeded(lambda: model_class(config)), tokenizer, "model.layers",
                head_dim=extra.get("head_dim", 8))


# model_type: config, model, layer list, out projection and the attention block that returns the heads.
ENCODERS = {
    "bert": (tf.BertConfig, tf.BertModel, "encoder.layer", "attention.output.dense", "attention.self"),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, "encoder.layer", "attention.output.dense", "attention.self"),
    "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaModel, "encoder.layer", "attention.output.dense",
                    "attention.self"),
    "electra": (tf.ElectraConfig, tf.ElectraModel, "encoder.layer", "attention.output.dense", "attention.self"),
    "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2Model, "encoder.layer", "attention.output.dense", "attention.self"),
    "mpnet": (tf.MPNetConfig, tf.MPNetModel, "encoder.layer", "attention.attn.o", None),
    "distilbert": (tf.DistilBertConfig, tf.DistilBertModel, "transformer.layer", "attention.out_lin", None),
}


def encoder(family: str = "bert") -> Tiny:
    """A BERT-style encoder, read at its last input token ([SEP]); no chat template.

    Where no block returns the heads before the projection (MPNet, DistilBERT), the check is the
    attention block's projected output instead.
    """
    config_class, model_class, layers, out_proj, heads_block = ENCODERS[family]
    tokenizer = byte_tokenizer(encoder=True)
    feed_forward = {"hidden_dim": 64} if family == "distilbert" else {"intermediate_size": 64}
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **feed_forward,
                          vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    attention = heads_block or out_proj.rsplit(".", 1)[0]
    return Tiny(seeded(lambda: model_class(config)), tokenizer, layers, out_proj=out_proj, attention=attention,
                context=heads_block is not None, sep_token_id=tokenizer.eos_token_id)


def _clip(image_size: int, patch_size: int) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


def _siglip(image_size: int, patch_size: int) -> tf.SiglipVisionConfig:
    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)


def llava_next() -> Tiny:
    """LLaVA-NeXT: CLIP tower, any-resolution tiling over a small grid of pinpoints, Llama text model."""
    size, patch, pinpoints = 16, 8, [[16, 32], [32, 16], [32, 32]]
    tokenizer = byte_tokenizer(chat_image="<image>\n", image_token="<image>")
    config = tf.LlavaNextConfig(
        vision_config=_clip(size, patch), image_grid_pinpoints=pinpoints,
        text_config=tf.LlamaConfig(**text_config(tokenizer)),
        image_token_index=tokenizer.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2,
    )
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(
        image_processor, tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template)
    model = seeded(lambda: tf.LlavaNextForConditionalGeneration(config))
    return Tiny(model, processor, "model.language_model.layers")


def llava_onevision() -> Tiny:
    """LLaVA-OneVision: SigLIP tower, any-resolution tiling, Qwen2 text model."""
    size, patch, pinpoints = 16, 8, [[16, 16], [16, 32], [32, 16], [32, 32]]
    tokenizer = byte_tokenizer(chat_image="<image>\n", image_token="<image>", video_token="<video>")
    config = tf.LlavaOnevisionConfig(
        vision_config=_siglip(size, patch), image_grid_pinpoints=pinpoints,
        text_config=tf.Qwen2Config(**text_config(tokenizer)),
        image_token_index=tokenizer.image_token_id, video_token_index=tokenizer.video_token_id,
    )
    image_processor = tf.LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                         image_grid_pinpoints=pinpoints)
    processor = without_video(tf.LlavaOnevisionProcessor)(
        image_processor, tokenizer, num_image_tokens=(size // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template)
    model = seeded(lambda: tf.LlavaOnevisionForConditionalGeneration(config))
    return Tiny(model, processor, "model.language_model.layers")


def qwen_vl(version: str = "2") -> Tiny:
    """Qwen2-VL / Qwen2.5-VL: native-resolution patches merged 2x2, 3-D rotary positions (mrope)."""
    vision_start, image_pad, vision_end = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
    tokenizer = byte_tokenizer([vision_start, vision_end], chat_image=vision_start + image_pad + vision_end,
                               image_token=image_pad, video_token="<|video_pad|>")
    # mrope splits half of head_dim (8) over time, height and width
    text = text_config(tokenizer, rope_parameters={"rope_type": "mrope", "mrope_section": [2, 1, 1]})
    patch = 4
    vision = {"depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": patch, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if version == "2":
        config_class, model_class = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        processor_class = tf.Qwen2VLProcessor
        vision |= {"embed_dim": 32, "mlp_ratio": 2}
    else:
        config_class, model_class = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        processor_class = tf.Qwen2_5_VLProcessor
        vision |= {"intermediate_size": 64, "out_hidden_size": 32, "window_size": 16, "fullatt_block_indexes": [1]}
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, vision_start_token_id=token_id(tokenizer, vision_start),
        vision_end_token_id=token_id(tokenizer, vision_end),
    )
    factor = patch * 2
    image_processor = tf.Qwen2VLImageProcessorPil(
        size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor}, patch_size=patch,
        merge_size=2, temporal_patch_size=2)
    processor = without_video(processor_class)(image_processor, tokenizer, chat_template=tokenizer.chat_template)
    return Tiny(seeded(lambda: model_class(config)), processor, "model.language_model.layers")


def idefics3(smolvlm: bool = False) -> Tiny:
    """Idefics3 / SmolVLM: SigLIP-style tower, pixel shuffle (scale 2), Llama text model; no image splitting.

    SmolVLM's own processor needs ``num2words`` and a video processor (torchvision); its model reads the
    same token layout as Idefics3's, so Idefics3's processor feeds both.
    """
    size, patch, scale = 32, 8, 2
    tokenizer = byte_tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
                               chat_image="<image>", image_token="<image>")
    config_class, vision_class, model_class = (
        (tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMForConditionalGeneration) if smolvlm
        else (tf.Idefics3Config, tf.Idefics3VisionConfig, tf.Idefics3ForConditionalGeneration))
    vision = vision_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=size, patch_size=patch)
    config = config_class(vision_config=vision, text_config=tf.LlamaConfig(**text_config(tokenizer)),
                          scale_factor=scale, image_token_id=tokenizer.image_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    image_processor = tf.Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": size},
                                                   max_image_size={"longest_edge": size})
    processor = tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=(size // patch) ** 2 // scale**2,
                                     chat_template=tokenizer.chat_template)
    return Tiny(seeded(lambda: model_class(config)), processor, "model.text_model.layers")


def gemma3() -> Tiny:
    """Gemma 3: SigLIP tower pooled to 4 tokens, sliding and global layers, head_dim 16 != hidden / heads."""
    size, patch = 32, 8
    tokenizer = byte_tokenizer(chat_image="<start_of_image>", boi_token="<start_of_image>",
                               eoi_token="<end_of_image>", image_token="<image_soft_token>")
    text = tf.Gemma3TextConfig(**text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]))
    config = tf.Gemma3Config(text_config=text, vision_config=_siglip(size, patch), mm_tokens_per_image=4,
                             boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                             image_token_index=tokenizer.image_token_id)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = tf.Gemma3Processor(image_processor, tokenizer, image_seq_length=4,
                                   chat_template=tokenizer.chat_template)

    def build() -> PreTrainedModel:
        model = tf.Gemma3ForConditionalGeneration(config)
        # Gemma 3 starts its image projection at zero (images would be invisible): give it random weights.
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
        return model

    return Tiny(seeded(build), processor, "model.language_model.layers", head_dim=16)


def internvl() -> Tiny:
    """InternVL: InternViT tower, pixel shuffle (ratio 0.5) to 4 tokens per tile, Qwen2 text model."""
    size, patch = 32, 8
    tokenizer = byte_tokenizer(chat_image="<IMG_CONTEXT>", start_image_token="<img>", end_image_token="</img>",
                               context_image_token="<IMG_CONTEXT>", video_token="<video>")
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=[size, size], patch_size=[patch, patch])
    config = tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**text_config(tokenizer)),
                               image_token_id=tokenizer.context_image_token_id, image_seq_length=4)
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": size, "width": size}, max_patches=2)
    processor = without_video(tf.InternVLProcessor)(image_processor, tokenizer, image_seq_length=4,
                                                    chat_template=tokenizer.chat_template)
    model = seeded(lambda: tf.InternVLForConditionalGeneration(config))
    return Tiny(model, processor, "model.language_model.layers")


def aya_vision() -> Tiny:
    """Aya Vision: SigLIP tower, pixel shuffle (factor 2), Cohere2 text model with sliding and global layers."""
    size, patch = 32, 8
    tokenizer = byte_tokenizer(["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
                                "TILE", "TILE_GLOBAL"], chat_image="<image>")
    text = tf.Cohere2Config(**text_config(tokenizer, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"]))
    config = tf.AyaVisionConfig(vision_config=_siglip(size, patch), text_config=text, downsample_factor=2,
                                image_token_index=token_id(tokenizer, "<|IMG_PATCH|>"))
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": size, "width": size}, max_patches=2)
    processor = tf.AyaVisionProcessor(image_processor, tokenizer, patch_size=patch, img_size=size,
                                      downsample_factor=2, chat_template=tokenizer.chat_template)
    model = seeded(lambda: tf.AyaVisionForConditionalGeneration(config))
    return Tiny(model, processor, "model.language_model.layers")


def mistral3() -> Tiny:
    """Mistral 3: Pixtral tower at native aspect ratio, 2x2 patch merge, Mistral text model.

    Hand-built inputs: ``PixtralProcessor`` needs torchvision, so the test lays out its prompt itself,
    a row of ``[IMG]`` per merged patch row closed by ``[IMG_BREAK]`` (the last by ``[IMG_END]``), and
    takes ``pixel_values`` and ``image_sizes`` from Pixtral's own image processor.
    """
    size, patch, merge = 32, 8, 2
    tokenizer = byte_tokenizer(["[INST]", "[/INST]", "[IMG_BREAK]", "[IMG_END]"], image_token="[IMG]")
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, head_dim=8, image_size=size, patch_size=patch)
    config = tf.Mistral3Config(vision_config=vision, text_config=tf.MistralConfig(**text_config(tokenizer)),
                               spatial_merge_size=merge, image_token_index=tokenizer.image_token_id)
    image_processor = tf.PixtralImageProcessorPil(size={"longest_edge": size}, patch_size=patch)

    def encode(texts: Sequence[str], images: Sequence[Image.Image | None], padding_side: str | None) -> BatchEncoding:
        pictures = [image.convert("RGB") for image in images if image is not None]
        pixels = image_processor(pictures, return_tensors="pt") if pictures else {}
        sizes = iter(pixels["image_sizes"].tolist() if pictures else [])
        prompts = []
        for text, image in zip(texts, images):
            slot = ""
            if image is not None:
                height, width = next(sizes)
                row = "[IMG]" * (width // (patch * merge))
                slot = "[IMG_BREAK]".join([row] * (height // (patch * merge))) + "[IMG_END]"
            prompts.append(f"<s>[INST]{slot}{text}[/INST]")
        inputs = tokenizer(prompts, padding=True, padding_side=padding_side or tokenizer.padding_side,
                           add_special_tokens=False, return_tensors="pt")
        return BatchEncoding({**inputs, **pixels})

    model = seeded(lambda: tf.Mistral3ForConditionalGeneration(config))
    return Tiny(model, None, "model.language_model.layers", hand_built=encode)


def llava() -> Tiny:
    """LLaVA-1.5: the embedded tiny model (CLIP tower, Llama text model with grouped-query attention)."""
    from sahs.extract.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0, text_layers=2)
    return Tiny(model, processor, "model.language_model.layers", head_dim=16)


# Families without a vision tower.
TEXT_FAMILIES = ("llama", "qwen2", "gemma", *ENCODERS)
FAMILIES: dict[str, Callable[[], Tiny]] = {
    "llava-1.5": llava,
    "llava-next": llava_next,
    "llava-onevision": llava_onevision,
    "qwen2-vl": partial(qwen_vl, "2"),
    "qwen2.5-vl": partial(qwen_vl, "2.5"),
    "idefics3": idefics3,
    "smolvlm": partial(idefics3, smolvlm=True),
    "gemma3": gemma3,
    "internvl": internvl,
    "mistral3": mistral3,
    "aya-vision": aya_vision,
    "llama": partial(text_lm, "llama"),
    "qwen2": partial(text_lm, "qwen2"),
    "gemma": partial(text_lm, "gemma"),
    **{name: partial(encoder, name) for name in ENCODERS},
}
