"""Every supported family: the adapter finds its heads, and the capture agrees with the model's own tensors.

Each family is a tiny random model of its real transformers class (``tests/families.py``), fed through
``encode_batch`` with its own processor (Mistral 3: hand-built inputs, see its builder).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from PIL import Image
from torch import nn

from sahs.extract import adapters
from sahs.extract.adapters import UnsupportedModelError, find_adapter
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import AUTO_MODELS, ModelConfig, load_model, resolve_kind
from tests.families import ENCODERS, FAMILIES, TEXT_FAMILIES, Tiny

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
IMAGE_A = Image.new("RGB", (40, 30), (230, 230, 230))
IMAGE_B = Image.new("RGB", (64, 64), (10, 120, 200))
TEXT_ONLY = [("Hi", None), ("Explain, step by step and with care, how photosynthesis works.", None)]
MIXED = [("How do I bake sourdough bread at home?", IMAGE_A), *TEXT_ONLY, ("What is in this picture?", IMAGE_B)]
VISION_FAMILIES = [name for name in FAMILIES if name not in TEXT_FAMILIES]
DECODER_FAMILIES = [name for name in FAMILIES if name not in ENCODERS]


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> Tiny:
    return FAMILIES[request.param]()


def prompts_for(tiny: Tiny) -> list[tuple[str, Image.Image | None]]:
    """Text-only models get the text-only prompts; vision models get images and text-only prompts mixed."""
    return MIXED if getattr(tiny.model.config, "vision_config", None) is not None else TEXT_ONLY


def capture_with_attention(
    tiny: Tiny, prompts: list[tuple[str, Image.Image | None]],
) -> tuple[torch.Tensor, torch.Tensor, tf.BatchEncoding, dict[int, torch.Tensor]]:
    """The capture, the read positions, the inputs, and each layer's attention-block output."""
    texts, images = zip(*prompts)
    inputs = tiny.encode(texts, images)
    positions = last_real_position(inputs["attention_mask"])
    layers = tiny.model.get_submodule(tiny.layers)
    outputs: dict[int, torch.Tensor] = {}
    handles = [layer.get_submodule(tiny.attention).register_forward_hook(
        lambda module, args, out, i=i: outputs.__setitem__(i, out[0])) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode(), HeadCapture(find_adapter(tiny.model)) as hooks:
            z = hooks.run(lambda: tiny.model(**inputs), positions)  # [batch, layers, heads, head_dim]
    finally:
        for handle in handles:
            handle.remove()
    return z, positions, inputs, outputs


def capture(tiny: Tiny, prompts: list[tuple[str, Image.Image | None]]) -> torch.Tensor:
    return capture_with_attention(tiny, prompts)[0]


def test_adapter_finds_every_layer_and_the_head_layout(tiny: Tiny):
    adapter = find_adapter(tiny.model)
    layers = tiny.model.get_submodule(tiny.layers)
    assert len(layers) == 2
    assert adapter.out_projs == tuple(layer.get_submodule(tiny.out_proj) for layer in layers)
    assert (adapter.layout.num_layers, adapter.layout.num_heads, adapter.layout.head_dim) == (
        2, tiny.num_heads, tiny.head_dim)


def test_projected_capture_is_the_attention_output(tiny: Tiny):
    """``o_proj(capture)`` equals the attention block's own output at the read position (BERT: no projection)."""
    z, positions, inputs, outputs = capture_with_attention(tiny, prompts_for(tiny))
    adapter = find_adapter(tiny.model)
    rows = torch.arange(z.shape[0])
    for layer, out_proj in enumerate(adapter.out_projs):
        with torch.inference_mode():
            heads = z[:, layer].flatten(1)  # [batch, heads * head_dim]
            produced = heads if tiny.context else out_proj(heads)
        torch.testing.assert_close(produced, outputs[layer][rows, positions], **TOLERANCE)


def test_read_position_is_the_last_prompt_token(tiny: Tiny):
    _, positions, inputs, _ = capture_with_attention(tiny, prompts_for(tiny))
    mask = inputs["attention_mask"]
    assert (mask[torch.arange(len(positions)), positions] == 1).all()
    assert (mask.cumsum(1).argmax(1) == positions).all()  # nothing real after it
    if tiny.sep_token_id is not None:  # encoders: right padding, read at [SEP]
        assert (inputs["input_ids"][torch.arange(len(positions)), positions] == tiny.sep_token_id).all()
        assert not (positions == mask.shape[1] - 1).all()
    else:  # decoders: left padding, so every row ends at the last column
        assert (positions == mask.shape[1] - 1).all()


def test_batched_equals_each_prompt_alone(tiny: Tiny):
    """Padding (and, for vision models, images next to text-only prompts) must not change any row."""
    prompts = prompts_for(tiny)
    batched = capture(tiny, prompts)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(batched[row], capture(tiny, [prompt])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tiny", DECODER_FAMILIES, indirect=True)
def test_either_padding_side_reads_the_same_heads(tiny: Tiny):
    """The read position comes from the mask, so a decoder padded on the right gives the same capture."""
    texts, images = zip(*prompts_for(tiny))
    inputs = tiny.encode(texts, images, padding_side="right")
    assert not inputs["attention_mask"][:, -1].all()
    with torch.inference_mode(), HeadCapture(find_adapter(tiny.model)) as hooks:
        right = hooks.run(lambda: tiny.model(**inputs), last_real_position(inputs["attention_mask"]))
    torch.testing.assert_close(right, capture(tiny, prompts_for(tiny)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tiny", VISION_FAMILIES, indirect=True)
def test_the_image_reaches_the_heads(tiny: Tiny):
    question = "What is in this picture?"
    a, b = capture(tiny, [(question, IMAGE_A), (question, IMAGE_B)])
    assert not torch.allclose(a, b, atol=1e-4)


def test_auto_loading_builds_the_same_class(tiny: Tiny):
    """``load_model``'s automatic kind maps each family's config back to the class tested here."""
    config = tiny.model.config
    with torch.device("meta"):
        rebuilt = AUTO_MODELS[resolve_kind("auto", config)].from_config(config)
    assert type(rebuilt) is type(tiny.model)


@pytest.mark.parametrize("tiny", list(TEXT_FAMILIES), indirect=True)
def test_a_saved_folder_loads_with_the_requested_options(tiny: Tiny, tmp_path):
    """Local folder, dtype, device and attention implementation go through; the heads are unchanged."""
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model(ModelConfig(name=str(tmp_path), dtype="float32", device="cpu",
                                                     attn_implementation="eager"))
    assert type(model) is type(tiny.model) and model.config._attn_implementation == "eager"
    assert loaded_tokenizer.padding_side == ("left" if tiny.sep_token_id is None else "right")
    reloaded = dataclasses.replace(tiny, model=model, processor=loaded_tokenizer)
    torch.testing.assert_close(capture(reloaded, TEXT_ONLY), capture(tiny, TEXT_ONLY), **TOLERANCE)


def test_a_model_without_attention_projections_is_refused_by_name(monkeypatch: pytest.MonkeyPatch):
    model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, num_hidden_layers=2, state_size=4, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"MambaForCausalLM.*OUT_PROJ_NAMES"):
        find_adapter(model)
    monkeypatch.setitem(adapters.OUT_PROJ_NAMES, "mamba", "mixer.out_proj")  # found now, but it has no heads
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM.*num_attention_heads"):
        find_adapter(model)


def test_an_ambiguous_layer_list_is_refused_unless_the_table_names_it(monkeypatch: pytest.MonkeyPatch):
    """Two lists of ``num_hidden_layers`` blocks: introspection cannot choose, the error says where to add it."""
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, vocab_size=64))
    model.model.shadow = nn.ModuleList([nn.Identity(), nn.Identity()])
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*LAYER_LIST_NAMES"):
        find_adapter(model)
    monkeypatch.setitem(adapters.LAYER_LIST_NAMES, "llama", "layers")
    assert find_adapter(model).out_projs == tuple(layer.self_attn.o_proj for layer in model.model.layers)
