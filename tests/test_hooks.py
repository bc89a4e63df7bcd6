"""The captured head activations equal independent computations from the model's own tensors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position


def capture(model, processor, prompts, **kwargs) -> torch.Tensor:
    texts, images = zip(*prompts)
    inputs = encode_batch(processor, texts, images)
    with torch.inference_mode(), HeadCapture(find_adapter(model), **kwargs) as hooks:
        return hooks.run(lambda: model(**inputs), last_real_position(inputs["attention_mask"]))


def manual_o_proj_input(model, processor, text, image, layer_index) -> torch.Tensor:
    """Recompute one layer's attention by hand from its input hidden state: ``[heads, head_dim]``."""
    inputs = encode_batch(processor, [text], [image])
    with torch.inference_mode():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer_index]  # [1, seq, hidden]
        language_model = model.model.language_model
        layer = language_model.layers[layer_index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        seq = x.shape[1]
        heads, kv_heads = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
        head_dim = attn.o_proj.in_features // heads
        q = attn.q_proj(x).view(1, seq, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, seq, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, seq, kv_heads, head_dim).transpose(1, 2)
        cos, sin = language_model.rotary_emb(x, torch.arange(seq)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        z = scores.softmax(-1) @ v  # [1, heads, seq, head_dim]
        return z[0, :, -1]


def test_capture_matches_hand_computed_attention(tiny_llava, mixed_prompts):
    model, processor = tiny_llava
    batched = capture(model, processor, mixed_prompts)  # [prompts, layers, heads, head_dim]
    for row, (text, image) in enumerate(mixed_prompts):
        for layer in range(batched.shape[1]):
            expected = manual_o_proj_input(model, processor, text, image, layer)
            torch.testing.assert_close(batched[row, layer], expected, atol=1e-4, rtol=1e-4)


def test_left_padding_does_not_shift_the_capture(tiny_llava, mixed_prompts):
    model, processor = tiny_llava
    batched = capture(model, processor, mixed_prompts)
    for row, prompt in enumerate(mixed_prompts):
        alone = capture(model, processor, [prompt])
        torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=1e-4)


def test_capture_projects_to_the_attention_output(tiny_llava, mixed_prompts):
    """o_proj applied to the capture gives the attention block's own output at that position."""
    model, processor = tiny_llava
    adapter = find_adapter(model)
    texts, images = zip(*mixed_prompts)
    inputs = encode_batch(processor, texts, images)
    outputs: dict[int, torch.Tensor] = {}
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0]))
               for i, layer in enumerate(model.model.language_model.layers)]
    positions = last_real_position(inputs["attention_mask"])
    try:
        with torch.inference_mode(), HeadCapture(adapter) as hooks:
            z = hooks.run(lambda: model(**inputs), positions)
    finally:
        for handle in handles:
            handle.remove()
    rows = torch.arange(len(texts))
    for layer, o_proj in enumerate(adapter.out_projs):
        with torch.inference_mode():
            projected = o_proj(z[:, layer].flatten(1))
        torch.testing.assert_close(projected, outputs[layer][rows, positions], atol=1e-5, rtol=1e-5)


def test_last_real_position_under_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert last_real_position(mask).tolist() == [4, 4, 1]


def test_early_exit_skips_later_layers_and_keeps_values(tiny_llava, mixed_prompts):
    model, processor = tiny_llava
    full = capture(model, processor, mixed_prompts)
    reached = []
    last = model.model.language_model.layers[-1]
    handle = last.register_forward_pre_hook(lambda m, a: reached.append(True))
    try:
        early = capture(model, processor, mixed_prompts, layers=[0, 1], early_exit=True)
    finally:
        handle.remove()
    assert not reached, "the forward ran past the last requested layer"
    torch.testing.assert_close(early, full[:, :2])


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_forward_fails(tiny_llava):
    model, _ = tiny_llava
    before = _hook_count(model)
    with pytest.raises(ValueError, match="boom"):
        with HeadCapture(find_adapter(model)) as hooks:
            assert _hook_count(model) == before + model.config.text_config.num_hidden_layers

            def fail():
                raise ValueError("boom")

            hooks.run(fail, torch.zeros(1, dtype=torch.long))
    assert _hook_count(model) == before


def test_layers_out_of_range_are_refused(tiny_llava):
    model, _ = tiny_llava
    with pytest.raises(ValueError, match="layers must be in"):
        HeadCapture(find_adapter(model), layers=[99])
