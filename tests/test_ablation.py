"""Head ablation hooks: exactly the chosen head's slice changes, at every position; means checked by hand."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.generation import generate_answers
from sahs.extract.interventions import ablated_heads, head_means

LAYER, HEAD = 2, 1


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@contextmanager
def recording(modules: dict[str, torch.nn.Module]):
    """Record each module's first input (as it reaches the module, after any earlier pre-hook)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].detach().clone()))
               for name, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def layer_modules(model, layer: int) -> dict[str, torch.nn.Module]:
    attention = model.model.language_model.layers[layer].self_attn
    return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": attention.o_proj}


def run(model, inputs, modules):
    with torch.inference_mode(), recording(modules) as seen:
        model(**inputs, use_cache=False)
    return {name: tensors[0] for name, tensors in seen.items()}


@pytest.fixture(scope="module")
def batch(tiny_llava, mixed_prompts):
    model, processor = tiny_llava
    texts, images = zip(*mixed_prompts)
    return encode_batch(processor, texts, images)


def test_zero_ablation_changes_exactly_that_head_at_every_position(tiny_llava, batch):
    model, _ = tiny_llava
    adapter = find_adapter(model)
    head_dim = adapter.layout.head_dim
    modules = {**layer_modules(model, LAYER), "next_o": layer_modules(model, LAYER + 1)["o"],
               "earlier_o": layer_modules(model, LAYER - 1)["o"]}
    clean = run(model, batch, modules)
    before_hooks = hook_count(model)  # after a forward: transformers keeps hooks of its own
    with ablated_heads(adapter, [(LAYER, HEAD)], "zero") as heads:
        assert heads == [(LAYER, HEAD)] and hook_count(model) == before_hooks + 1
        ablated = run(model, batch, modules)
    assert hook_count(model) == before_hooks

    for name in ("q", "k", "v", "earlier_o"):  # upstream of the head's output: untouched
        torch.testing.assert_close(ablated[name], clean[name], rtol=0, atol=0)
    z_clean, z_ablated = clean["o"], ablated["o"]  # [batch, pos, heads * head_dim]
    inside = slice(HEAD * head_dim, (HEAD + 1) * head_dim)
    assert torch.count_nonzero(z_ablated[..., inside]) == 0  # every position, padding included
    assert torch.count_nonzero(z_clean[..., inside]) > 0
    outside = torch.ones(z_clean.shape[-1], dtype=torch.bool)
    outside[inside] = False
    torch.testing.assert_close(z_ablated[..., outside], z_clean[..., outside], rtol=0, atol=0)
    assert not torch.allclose(ablated["next_o"], clean["next_o"])  # and it does reach later layers


def test_hooks_are_removed_when_the_block_raises(tiny_llava, batch):
    model, _ = tiny_llava
    run(model, batch, {})
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="inside"):
        with ablated_heads(find_adapter(model), [(0, 0), (3, 2)], "zero"):
            assert hook_count(model) == before + 2
            raise RuntimeError("failure inside the block")
    assert hook_count(model) == before


def test_generation_sees_the_ablation_at_every_new_token(tiny_llava, mixed_prompts):
    model, processor = tiny_llava
    adapter = find_adapter(model)
    texts, images = zip(*mixed_prompts)
    inside = slice(HEAD * adapter.layout.head_dim, (HEAD + 1) * adapter.layout.head_dim)
    with ablated_heads(adapter, [(LAYER, HEAD)]), recording({"o": adapter.out_projs[LAYER]}) as seen:
        generate_answers(model, processor, texts, images, max_new_tokens=4, batch_size=4)
    assert len(seen["o"]) == 4  # the prefill and three cached steps, one new position each
    assert all(torch.count_nonzero(z[..., inside]) == 0 for z in seen["o"])


def test_mean_ablation_writes_the_benign_mean_computed_by_hand(tiny_llava, mixed_prompts, batch):
    model, processor = tiny_llava
    adapter = find_adapter(model)
    layout = adapter.layout
    texts, images = zip(*mixed_prompts)
    means = head_means(model, processor, adapter, texts[:3], images[:3], batch_size=2)  # two batches
    assert means.shape == (layout.num_layers, layout.num_heads, layout.head_dim)

    # By hand: one prompt at a time (no padding at all), every position, pooled over the prompts.
    for layer in (0, LAYER):
        rows = []
        for text, image in zip(texts[:3], images[:3]):
            single = encode_batch(processor, [text], [image])
            rows.append(run(model, single, {"o": adapter.out_projs[layer]})["o"][0])  # [pos, width]
        expected = torch.cat(rows).double().mean(dim=0).view(layout.num_heads, layout.head_dim).float()
        torch.testing.assert_close(means[layer], expected, atol=1e-5, rtol=1e-5)

    clean = run(model, batch, {"o": adapter.out_projs[LAYER]})["o"]
    with ablated_heads(adapter, [(LAYER, HEAD), (LAYER, 3)], "mean", means):
        z = run(model, batch, {"o": adapter.out_projs[LAYER]})["o"]
    z, clean = z.view(*z.shape[:2], layout.num_heads, -1), clean.view(*clean.shape[:2], layout.num_heads, -1)
    for head in range(layout.num_heads):
        if head in (HEAD, 3):
            assert torch.equal(z[:, :, head], means[LAYER, head].expand_as(z[:, :, head]))
        else:
            torch.testing.assert_close(z[:, :, head], clean[:, :, head], rtol=0, atol=0)


def test_bad_heads_and_modes_fail_with_a_clear_message(tiny_llava):
    adapter = find_adapter(tiny_llava[0])
    with pytest.raises(ValueError, match=r"head \(4, 0\) does not exist: the model has 4 layers of 4 heads"):
        with ablated_heads(adapter, [(4, 0)]):
            pass
    with pytest.raises(ValueError, match="mode must be 'zero' or 'mean'"):
        with ablated_heads(adapter, [(0, 0)], "random"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="needs per-head means of shape"):
        with ablated_heads(adapter, [(0, 0)], "mean"):
            pass
