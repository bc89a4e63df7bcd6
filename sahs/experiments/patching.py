"""Activation patching: how far the refusal decision moves when one head's activation comes from the twin prompt.

For each pair (a malicious prompt and a benign one), both prompts run in one left-padded batch, so their
positions line up from the end. The metric is the refusal logit difference at the first generated token:
the mean logit of the refusal answers' first tokens minus the compliance answers'. Per (layer, head), one
forward of the pair batch patches that head's ``o_proj`` input in both directions at once: the malicious
rows get the benign rows' values and the benign rows the malicious rows' (at every position both prompts
have, or at the last one). Path patching to the final position is computed from the clean forward alone:
the head's changed output at the last position goes straight into the final residual stream and through
the final norm and the unembedding, with every later layer held at its clean values (the direct path).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn
from transformers import PreTrainedModel

from sahs.errors import UserError
from sahs.eval.refusal import PhraseJudge, RefusalJudge
from sahs.experiments.patching_report import PatchingResult
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import _template_owner, encode_batch, format_prompt, is_multimodal
from sahs.extract.generation import model_device
from sahs.extract.hooks import last_real_position
from sahs.extract.interventions import AblationError, final_norm, patched_head, recorded_heads

# For real chat models: how their refusals and compliances usually begin.
DEFAULT_REFUSAL_TOKENS = ["I'm sorry", "I cannot", "I can't"]
DEFAULT_COMPLIANCE_TOKENS = ["Sure", "Here", "Certainly"]


class PatchingError(UserError, ValueError):
    """Patching settings or pairs that cannot work: the message says what to change."""


@dataclass
class PatchSettings:
    """What is patched, over which pairs, and how the decision is read.

    Args:
        refusal_tokens: Answers whose first token counts as refusing (each string's first token as the model
            would write it after its chat template's assistant turn; duplicates count once).
        compliance_tokens: Answers whose first token counts as complying.
        positions: ``all``: every position both prompts of a pair have (aligned from the end); ``last``: the last one.
        pairing: ``family``: malicious and benign prompts of the same attack family in id order (the built-in
            sets' twins, ``...-mal-0003`` with ``...-ben-0003``); ``group``: within a request group holding both
            labels; ``file``: the pairs listed in ``pairs_file``.
        pairs_file: CSV or JSONL with the columns ``malicious_id, benign_id`` (ids of the prompt set), for ``file``.
        split: The rows pairs come from: the run's ``test`` split (default), ``val``, ``train`` or ``all`` (a
            ``pairs_file``'s pairs are taken as listed).
        max_pairs: Pairs used at most (a seeded draw when there are more).
        batch_size: Pairs per forward (each forward runs twice as many prompts).
        top_k: Heads labelled in the plots, compared with the probe's top k, written to ``top_heads.yaml`` and
            judged after generation.
        max_new_tokens: Tokens generated per answer for the judged refusal rates; 0 skips generation.
        judge: Refusal judge (``class_path`` / ``init_args``); None: the refusal-phrase matcher ``PhraseJudge()``.
        n_boot: Bootstrap replicates of the intervals (pairs resampled by the malicious prompt's request group).
        seed: Seed of the pair draw and of the bootstrap.
        progress: Show a progress bar over the heads.
    """

    refusal_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_TOKENS))
    compliance_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_COMPLIANCE_TOKENS))
    positions: Literal["all", "last"] = "all"
    pairing: Literal["family", "group", "file"] = "family"
    pairs_file: str | None = None
    split: Literal["test", "val", "train", "all"] = "test"
    max_pairs: int = 64
    batch_size: int = 16
    top_k: int = 4
    max_new_tokens: int = 16
    judge: RefusalJudge | None = None
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_pairs < 1 or self.batch_size < 1 or self.top_k < 1 or self.n_boot < 1:
            raise PatchingError("patch.max_pairs, batch_size, top_k and n_boot must be at least 1")
        if self.max_new_tokens < 0:
            raise PatchingError(f"patch.max_new_tokens must be 0 (no generation) or more, got {self.max_new_tokens}")
        if not self.refusal_tokens or not self.compliance_tokens:
            raise PatchingError("patch.refusal_tokens and patch.compliance_tokens each need at least one answer")
        if (self.pairing == "file") != (self.pairs_file is not None):
            raise PatchingError("patch.pairs_file goes with patch.pairing: file (and only with it)")


def answer_token(processor: Any, answer: str) -> int:
    """The first token the model writes when it answers ``answer``: the assistant turn of its chat template
    after a user turn, tokenized, minus the generation prompt's tokens (raw text when there is no template)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    owner = _template_owner(processor)
    prefix, continuation = "", answer
    if owner is not None:
        def content(text: str) -> Any:
            return [{"type": "text", "text": text}] if is_multimodal(owner) else text
        prefix = format_prompt(processor, "x", False)
        full = owner.apply_chat_template([{"role": "user", "content": content("x")},
                                          {"role": "assistant", "content": content(answer)}], tokenize=False)
        if full.startswith(prefix):
            continuation = full[len(prefix):]
    before = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    after = tokenizer(prefix + continuation, add_special_tokens=False).input_ids
    common = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    if common >= len(after):
        raise PatchingError(f"the answer {answer!r} adds no token after the chat template's assistant turn")
    return int(after[common])


def decision_tokens(processor: Any, settings: PatchSettings) -> tuple[list[int], list[int]]:
    """The refusal and compliance first-token ids (duplicates dropped); an id on both sides is refused."""
    refusal = sorted({answer_token(processor, text) for text in settings.refusal_tokens})
    compliance = sorted({answer_token(processor, text) for text in settings.compliance_tokens})
    shared = set(refusal) & set(compliance)
    if shared:
        tokenizer = getattr(processor, "tokenizer", processor)
        raise PatchingError(f"refusal and compliance answers begin with the same token "
                            f"{tokenizer.convert_ids_to_tokens(sorted(shared))}: choose answers that differ "
                            "in their first token (patch.refusal_tokens, patch.compliance_tokens)")
    return refusal, compliance


def make_pairs(prompts: datasets.Dataset, rows: Sequence[int], settings: PatchSettings) -> list[tuple[int, int]]:
    """``(malicious row, benign row)`` pairs among ``rows`` of ``prompts``, at most ``max_pairs`` (seeded draw)."""
    ids, labels = prompts["id"], prompts["label"]
    if settings.pairing == "file":
        pairs = _pairs_from_file(Path(settings.pairs_file), {pid: i for i, pid in enumerate(ids)}, labels)
    else:
        key = prompts["attack" if settings.pairing == "family" else "group"]
        sides: dict[str, tuple[list[int], list[int]]] = {}
        for row in sorted(rows, key=lambda r: ids[r]):
            sides.setdefault(key[row], ([], []))[int(labels[row])].append(row)
        pairs = [(mal, ben) for name in sorted(sides) for ben, mal in zip(*sides[name])]
    if not pairs:
        how = {"family": "an attack family", "group": "a request group"}.get(settings.pairing, "the file")
        raise PatchingError(f"no malicious/benign pair in {how} among the {len(rows)} prompts of split "
                            f"{settings.split!r}: use another patch.pairing or patch.split")
    if len(pairs) > settings.max_pairs:
        order = np.random.default_rng(settings.seed).permutation(len(pairs))[:settings.max_pairs]
        pairs = [pairs[i] for i in sorted(order)]
    return pairs


def _pairs_from_file(path: Path, position: dict[str, int], labels: Sequence[int]) -> list[tuple[int, int]]:
    import csv
    import json

    if not path.is_file():
        raise PatchingError(f"patch.pairs_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else list(csv.DictReader(text.splitlines())))
    except (ValueError, csv.Error) as error:
        raise PatchingError(f"{path} is not valid {'JSONL' if path.suffix == '.jsonl' else 'CSV'}: {error}") from None
    pairs = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not {"malicious_id", "benign_id"} <= set(record):
            raise PatchingError(f"{path} row {number}: needs the columns malicious_id and benign_id")
        mal, ben = (position.get(str(record[k])) for k in ("malicious_id", "benign_id"))
        if mal is None or ben is None:
            missing = record["malicious_id"] if mal is None else record["benign_id"]
            raise PatchingError(f"{path} row {number}: no prompt with id {missing!r} in the configured prompt set")
        if labels[mal] != 1 or labels[ben] != 0:
            raise PatchingError(f"{path} row {number}: {record['malicious_id']!r} must be malicious (label 1) and "
                                f"{record['benign_id']!r} benign (label 0)")
        pairs.append((mal, ben))
    return pairs


def _batches(prompts: datasets.Dataset, pairs: Sequence[tuple[int, int]], size: int):
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        rows = [mal for mal, _ in chunk] + [ben for _, ben in chunk]  # malicious rows first, then their twins
        picked = prompts.select(rows)
        yield start, len(chunk), picked["text"], picked["image"]


class _Reader:
    """The refusal logit difference at the last position of a batch (``[batch]``).

    ``record`` runs the whole model once and keeps the language model's own call (its input embeddings,
    images merged in); while that call reproduces the model's output, later reads replay it alone, so the
    vision tower and the embedding run once per pair batch rather than once per head.
    """

    def __init__(self, model: PreTrainedModel, refusal: list[int], compliance: list[int]):
        self.model = model
        self.refusal, self.compliance = torch.tensor(refusal), torch.tensor(compliance)
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def metric(self, logits: torch.Tensor) -> torch.Tensor:  # [..., vocab] -> [...]
        logits = logits.float()
        return logits[..., self.refusal].mean(-1) - logits[..., self.compliance].mean(-1)

    @torch.inference_mode()
    def forward(self, inputs: Any) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        logits = self.model(**inputs, use_cache=False, **extra).logits  # [batch, 1 or pos, vocab]
        return self.metric(logits[:, -1]).cpu()

    @torch.inference_mode()
    def replay(self) -> torch.Tensor:
        args, kwargs = self.call
        output = self.decoder(*args, **kwargs)
        hidden = output[0][:, -1]  # [batch, d_model], after the final norm
        return self.metric(self.model.get_output_embeddings()(hidden)).cpu()

    def record(self, inputs: Any) -> torch.Tensor:
        """A full forward of ``inputs``, keeping the language model's call for ``__call__`` to replay."""
        self.call, seen = None, {}
        if not isinstance(self.decoder, nn.Module) or self.decoder is self.model:
            return self.forward(inputs)

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault("call", (args, dict(kwargs)))

        handle = self.decoder.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            base = self.forward(inputs)
        finally:
            handle.remove()
        self.call = seen.get("call")
        return base

    def check(self, base: torch.Tensor) -> None:
        """Keep the recorded call only if replaying it gives ``base`` (no final logit transform, no side input)."""
        if self.call is not None:
            again = self.replay()
            if not torch.allclose(again, base, rtol=1e-4, atol=1e-4 * (1 + float(base.abs().max()))):
                self.call = None

    def __call__(self, inputs: Any) -> torch.Tensor:
        return self.replay() if self.call is not None else self.forward(inputs)


def _encode(model: PreTrainedModel, processor: Any, texts, images):
    inputs = encode_batch(processor, texts, images, padding_side="left").to(model_device(model))
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs["attention_mask"].bool()
    if not mask[:, -1].all():
        raise PatchingError("the processor did not pad on the left: patching reads every row's last position")
    return inputs, mask


def _swap(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Malicious rows (the first ``n``) exchanged with their benign twins (the next ``n``)."""
    return torch.cat([tensor[n:], tensor[:n]])


def _unembedded(model, reader, normed: torch.Tensor) -> torch.Tensor:
    """The metric from final-norm outputs ``[..., d_model]``, through the unembedding rows of the answer tokens."""
    unembed = model.get_output_embeddings()
    ids = torch.cat([reader.refusal, reader.compliance]).to(unembed.weight.device)
    logits = normed.float() @ unembed.weight[ids].float().T  # [..., ids]
    if getattr(unembed, "bias", None) is not None:
        logits = logits + unembed.bias[ids].float()
    split = len(reader.refusal)
    return logits[..., :split].mean(-1) - logits[..., split:].mean(-1)


@torch.inference_mode()
def _reproduces(model, norm, reader, recorded, base: torch.Tensor) -> bool:
    """Whether the final norm and the unembedding give the forward's own metric (no final logit transform)."""
    again = _unembedded(model, reader, norm(recorded["resid"][:, -1])).cpu()
    return bool(torch.allclose(again, base, rtol=1e-3, atol=1e-3 * (1 + float(base.abs().max()))))


@torch.inference_mode()
def _direct_effects(model, norm, reader, adapter, recorded, n) -> torch.Tensor:
    """The metric when each head's change at the last position reaches the final norm directly: ``[batch, L, H]``."""
    layout = adapter.layout
    resid = recorded["resid"][:, -1].float()  # [batch, d_model]
    out = []
    for layer in range(layout.num_layers):
        z = recorded[layer][:, -1].float().view(-1, layout.num_heads, layout.head_dim)  # [batch, heads, head_dim]
        w_o = adapter.out_projs[layer].weight.float().view(-1, layout.num_heads, layout.head_dim)  # [d, heads, hd]
        delta = torch.einsum("bhk,dhk->bhd", _swap(z, n) - z, w_o)  # [batch, heads, d_model]
        out.append(_unembedded(model, reader, norm((resid[:, None] + delta).to(recorded["resid"].dtype))))
    return torch.stack(out, dim=1).cpu()


def run_patching(model: PreTrainedModel, processor: Any, prompts: datasets.Dataset,
                 pairs: Sequence[tuple[int, int]], settings: PatchSettings, *,
                 probe_auroc: torch.Tensor | None = None,
                 progress: Callable[[str], None] = lambda line: None) -> PatchingResult:
    """Patch every (layer, head) over ``pairs`` of ``prompts`` rows in both directions, read the decision,
    and (``max_new_tokens`` > 0) judge greedy answers with each of the top heads patched."""
    adapter = find_adapter(model)
    layout = adapter.layout
    refusal, compliance = decision_tokens(processor, settings)
    reader = _Reader(model, refusal, compliance)
    try:
        norm = final_norm(model)
    except AblationError as error:
        progress(f"no path patching: {error}")
        norm = None
    P, L, H = len(pairs), layout.num_layers, layout.num_heads
    clean = torch.zeros(2, P)
    patched = torch.zeros(2, P, L, H)
    direct = torch.zeros(2, P, L, H) if norm is not None else None
    bar = tqdm(total=L * H * -(-P // settings.batch_size), desc="patching heads", unit="head",
               disable=not settings.progress)
    for start, n, texts, images in _batches(prompts, pairs, settings.batch_size):
        inputs, mask = _encode(model, processor, texts, images)
        if settings.positions == "all":  # positions both prompts of a pair have (aligned from the end)
            where = mask[:n] & mask[n:]
            where = torch.cat([where, where])
        else:
            where = torch.zeros_like(mask)
            where[torch.arange(len(mask)), last_real_position(mask)] = True
        with recorded_heads(adapter, range(L), norm) as recorded:
            base = reader.record(inputs)
        reader.check(base)
        clean[:, start:start + n] = base.view(2, n)
        if direct is not None:
            direct[:, start:start + n] = _direct_effects(model, norm, reader, adapter, recorded, n).view(2, n, L, H)
            if not _reproduces(model, norm, reader, recorded, base):
                progress("no path patching: the final norm and the unembedding do not reproduce this model's logits")
                direct = None
        for layer in range(L):
            source = _swap(recorded[layer], n)
            for head in range(H):
                with patched_head(adapter, layer, head, source, where):
                    patched[:, start:start + n, layer, head] = reader(inputs).view(2, n)
                bar.update()
    bar.close()
    result = PatchingResult.from_measurements(
        clean=clean, patched=patched, direct=direct, pair_ids=[(prompts[m]["id"], prompts[b]["id"]) for m, b in pairs],
        groups=[prompts[m]["group"] for m, _ in pairs], attacks=[prompts[m]["attack"] for m, _ in pairs],
        tokens={"refusal": _names(processor, refusal), "compliance": _names(processor, compliance)},
        settings=settings, probe_auroc=probe_auroc)
    if settings.max_new_tokens > 0:
        progress(f"judging greedy answers with each of the top {settings.top_k} heads patched")
        result.generation = judged_refusals(model, processor, prompts, pairs, result.top(settings.top_k), settings)
    return result


def _names(processor: Any, ids: list[int]) -> list[dict[str, Any]]:
    tokenizer = getattr(processor, "tokenizer", processor)
    return [{"id": i, "token": tokenizer.convert_ids_to_tokens(i)} for i in ids]


@torch.inference_mode()
def judged_refusals(model: PreTrainedModel, processor: Any, prompts: datasets.Dataset,
                    pairs: Sequence[tuple[int, int]], heads: Sequence[tuple[int, int]],
                    settings: PatchSettings) -> list[dict[str, Any]]:
    """Refusal rates of greedy answers, unpatched and with each head in ``heads`` patched in the prompt
    (malicious prompts from their benign twins and the reverse); the answers' tokens run unpatched."""
    adapter = find_adapter(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    judge = settings.judge or PhraseJudge()
    answers: dict[str, list[str]] = {}
    texts_all: list[str] = []
    for start, n, texts, images in _batches(prompts, pairs, settings.batch_size):
        inputs, mask = _encode(model, processor, texts, images)
        texts_all += _interleave(list(texts), n)
        where = torch.cat([mask[:n] & mask[n:]] * 2) if settings.positions == "all" else torch.zeros_like(mask)
        if settings.positions == "last":
            where[:, -1] = True
        with recorded_heads(adapter, sorted({layer for layer, _ in heads})) as recorded:
            model(**inputs, use_cache=False)
        for name, head in [("none", None), *((f"L{layer}.H{h}", (layer, h)) for layer, h in heads)]:
            if head is None:
                output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            else:
                with patched_head(adapter, *head, _swap(recorded[head[0]], n), where):
                    output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
            new = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.setdefault(name, []).extend(_interleave([a.strip() for a in new], n))
    rows = []
    for name, batch in answers.items():
        refused = np.asarray(judge(batch, texts_all), dtype=float)
        malicious, benign = refused[0::2], refused[1::2]
        rows.append({"patched": name, "malicious_refusal_rate": float(malicious.mean()),
                     "benign_refusal_rate": float(benign.mean()), "answers": batch})
    return rows


def _interleave(values: list[str], n: int) -> list[str]:
    """``[mal_1..mal_n, ben_1..ben_n]`` as ``[mal_1, ben_1, mal_2, ...]``."""
    return [value for pair in zip(values[:n], values[n:]) for value in pair]
