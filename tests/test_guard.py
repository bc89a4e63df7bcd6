"""SafetyGuard on the embedded tiny LLaVA, against independent paths.

A detector is trained by `sahs fit` on a float32 cache and exported by `sahs export`. The guard's score
for a prompt must equal the score computed by hand from that cache (written by the extraction pipeline,
one prefill without generation) and the checkpoint's raw weights; unflagged prompts must get exactly
plain greedy `generate`'s tokens; flagged ones the refusal.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sahs.cli import main
from sahs.data.cache import ActivationCache
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.models import ModelConfig, model_identity
from sahs.extract.tiny import build_tiny_llava
from sahs.guard import DetectorMismatchError, SafetyGuard
from sahs.guard.guard import GuardSettingError
from sahs.models.artifact import DetectorArtifact
from sahs.prompts import DemoPrompts

ROOT = Path(__file__).resolve().parents[1]
HEADS = [[3, 1], [0, 2], [2, 0]]  # not in model order: the guard must keep the detector's feature order
PROMPTS = {"n_benign": 16, "n_malicious": 16, "attacks": ["text", "figstep"], "image_size": 64, "seed": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, checkpoint, cache folder, prompt set) of a detector fitted on the tiny LLaVA."""
    root = tmp_path_factory.mktemp("guard")
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"].update(max_epochs=4, default_root_dir=str(root / "run"), enable_progress_bar=False,
                             logger=False, enable_model_summary=False)
    extraction = config["trainer"]["callbacks"][0]["init_args"]
    extraction["model"] = {"name": "sahs/tiny-llava", "seed": 0}  # the guard is checked against the tiny LLaVA
    extraction["prompts"]["init_args"].update(PROMPTS)
    extraction["extraction"]["cache_dtype"] = "float32"
    extraction["progress"] = False
    config["data"].update(cache_dir=str(root / "cache"), heads=HEADS)
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    checkpoint = next((root / "run").rglob("best-*.ckpt"))
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(root / "detector")])
    return root / "detector", checkpoint, root / "cache", DemoPrompts(**PROMPTS).load()


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny_llava(seed=0)


def scores_from_cache(checkpoint: Path, cache_dir: Path, ids: list[str]) -> torch.Tensor:
    """The extraction path: cached activations of ``ids`` through the checkpoint's raw logistic weights."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    cache = ActivationCache(cache_dir)
    rows = [cache.column("id").index(prompt_id) for prompt_id in ids]
    x = cache.read([tuple(pair) for pair in HEADS])[rows].flatten(1)
    z = (x - state["feature_mean"]) / state["feature_std"]
    return torch.sigmoid(z @ state["detector.linear.weight"][0] + state["detector.linear.bias"][0])


def as_prompts(dataset, indices: list[int]) -> list[dict]:
    return [{"text": dataset[i]["text"], "image": dataset[i]["image"]} for i in indices]


def guard_for(exported, model_and_processor, **options) -> SafetyGuard:
    model, processor = model_and_processor
    return SafetyGuard(model, processor, DetectorArtifact.load(exported[0]), model_identity(ModelConfig()), **options)


def test_guard_score_equals_extraction_then_detector(exported, model_and_processor):
    detector, checkpoint, cache_dir, dataset = exported
    indices = [0, 1, 2, 5, 8, 13, 21, 30]
    assert {dataset[i]["image"] is None for i in indices} == {True, False}  # text-only and image prompts
    guard = guard_for(exported, model_and_processor, batch_size=3)
    results = guard.generate(as_prompts(dataset, indices), max_new_tokens=1)
    expected = scores_from_cache(checkpoint, cache_dir, [dataset[i]["id"] for i in indices])
    torch.testing.assert_close(torch.tensor([r.score for r in results]), expected, atol=1e-6, rtol=1e-5)


def trimmed(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_flagged_prompts_are_refused_and_the_others_get_plain_greedy_tokens(exported, model_and_processor):
    model, processor = model_and_processor
    _, checkpoint, cache_dir, dataset = exported
    indices = [3, 4, 9, 10, 17, 26]
    scores = scores_from_cache(checkpoint, cache_dir, [dataset[i]["id"] for i in indices])
    middle = scores.sort().values[len(indices) // 2 - 1:len(indices) // 2 + 1]
    threshold = float(middle.mean())  # halfway between two scores: no prompt sits on the threshold
    guard = guard_for(exported, model_and_processor, threshold=threshold, refusal="No.", batch_size=len(indices))
    prompts = as_prompts(dataset, indices)
    results = guard.generate(prompts, max_new_tokens=6)

    inputs = encode_batch(processor, [p["text"] for p in prompts], [p["image"] for p in prompts])
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    flagged = [r.flagged for r in results]
    assert flagged == (scores >= threshold).tolist() and any(flagged) and not all(flagged)
    eos = model.generation_config.eos_token_id
    for result, row in zip(results, plain.tolist()):
        if result.flagged:
            assert result.answer == "No." and result.token_ids == []
        else:
            assert result.token_ids == trimmed(row, eos) and len(result.token_ids) > 0
            assert result.answer == processor.decode(result.token_ids, skip_special_tokens=True)


def test_one_prefill_no_second_forward_and_no_hooks_left(exported, model_and_processor):
    model, processor = model_and_processor
    dataset = exported[3]
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.inference_mode():
            inputs = encode_batch(processor, [dataset[2]["text"]], [dataset[2]["image"]])
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
            plain_forwards = len(calls)
            calls.clear()
            guard_for(exported, model_and_processor, threshold=2.0).generate(as_prompts(dataset, [2]), max_new_tokens=4)
            passing_forwards = len(calls)
            calls.clear()
            guard_for(exported, model_and_processor, threshold=0.0).generate(as_prompts(dataset, [2]), max_new_tokens=4)
            refused_forwards = len(calls)
    finally:
        handle.remove()
    assert plain_forwards == passing_forwards == 4 and refused_forwards == 1  # a refusal stops after the prefill
    assert all(not out_proj._forward_pre_hooks for out_proj in find_adapter(model).out_projs)


def test_a_detector_for_another_model_refuses_to_start(exported, model_and_processor):
    model, processor = model_and_processor
    artifact = DetectorArtifact.load(exported[0])
    with pytest.raises(DetectorMismatchError, match=r"sahs/tiny-llava.*differs: model\.seed"):
        SafetyGuard.load(exported[0], ModelConfig(seed=1))
    with pytest.raises(DetectorMismatchError, match="differs: model.dtype"):
        SafetyGuard(model, processor, artifact, model_identity(ModelConfig(dtype="bfloat16")))
    elsewhere = dataclasses.replace(artifact.features, fingerprint={
        **artifact.features.fingerprint, "extraction": {**artifact.features.fingerprint["extraction"], "hook": "mlp_out"}})
    with pytest.raises(DetectorMismatchError, match="mlp_out"):
        SafetyGuard(model, processor, dataclasses.replace(artifact, features=elsewhere), model_identity(ModelConfig()))
    smaller, smaller_processor = build_tiny_llava(seed=0, text_layers=2)
    with pytest.raises(DetectorMismatchError, match="num_layers"):  # same claimed identity, other shape
        SafetyGuard(smaller, smaller_processor, artifact, model_identity(ModelConfig()))


def test_guard_command_reads_jsonl_and_writes_scores_and_answers(exported, tmp_path, monkeypatch, capsys):
    detector, checkpoint, cache_dir, dataset = exported
    with_image = next(i for i in range(len(dataset)) if dataset[i]["image"] is not None)
    dataset[with_image]["image"].save(tmp_path / "picture.png")  # PNG is lossless: the same pixels
    lines = [{"id": "a", "text": dataset[0]["text"]} if dataset[0]["image"] is None else {"id": "a", "text": "Hi"},
             {"id": "b", "text": dataset[with_image]["text"], "image": "picture.png"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    main(["guard", "--detector", str(detector), "--model", "sahs/tiny-llava", "--input", str(tmp_path / "prompts.jsonl"),
          "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "3", "--refusal", "Refused."])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [record["id"] for record in out] == ["a", "b"]
    expected = scores_from_cache(checkpoint, cache_dir, [dataset[with_image]["id"]])
    assert out[1]["score"] == pytest.approx(float(expected[0]), abs=1e-6)
    for record in out:
        assert set(record) == {"id", "score", "flagged", "answer"}
        assert record["flagged"] == (record["score"] >= DetectorArtifact.load(detector).threshold)
        assert (record["answer"] == "Refused.") == record["flagged"]

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"text": lines[0]["text"]}) + "\n"))
    main(["guard", "--detector", str(detector), "--max_new_tokens", "2"])
    (from_stdin,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert from_stdin["score"] == pytest.approx(out[0]["score"], abs=1e-6)


def test_bad_lines_get_an_error_line_and_every_other_line_its_answer(exported, model_and_processor, tmp_path, capsys):
    detector, _, _, dataset = exported
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    texts = [dataset[i]["text"] for i in (0, 1, 4)]
    lines = [json.dumps({"id": "a", "text": texts[0]}), "{not json", json.dumps(["a", "list"]),
             json.dumps({"id": "d", "prompt": "no text field"}), json.dumps({"id": "e", "text": "x", "image": "gone.png"}),
             json.dumps({"text": "x", "image": "folder.png"}), json.dumps({"id": "g", "text": "x", "image": "broken.png"}),
             json.dumps({"id": "h", "text": texts[1]}), "", json.dumps({"text": texts[2]})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as verdict:
        main(["guard", "--detector", str(detector), "--input", str(tmp_path / "prompts.jsonl"), "--output",
              str(tmp_path / "out.jsonl"), "--max_new_tokens", "2", "--batch_size", "2"])
    assert verdict.value.code == 3  # some lines failed: not 0, not a user error's 2
    assert "6 lines" in capsys.readouterr().err
    raw = (tmp_path / "out.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in raw]
    assert [o.get("id", o.get("line")) for o in out] == ["a", 2, 3, "d", "e", 6, "g", "h", None]  # input order
    errors = {o.get("id", o.get("line")): o["error"] for o in out if "error" in o}
    assert sorted(errors, key=str) == sorted([2, 3, "d", "e", 6, "g"], key=str)
    assert "not JSON" in errors[2] and "text" in errors[3] and "text" in errors["d"]
    assert "gone.png" in errors["e"] and "folder.png" in errors[6] and "broken.png" in errors["g"]
    answered = [o for o in out if "error" not in o]
    plain = guard_for(exported, model_and_processor).generate([{"text": t} for t in texts], max_new_tokens=2)
    for got, expected in zip(answered, plain):  # the same answers as a run without the bad lines
        assert got["score"] == pytest.approx(expected.score, abs=1e-6) and got["flagged"] == expected.flagged
        assert got["answer"] == expected.answer


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_prompt_whose_generation_fails_gets_an_error_and_the_batch_its_answers(exported, model_and_processor,
                                                                                 monkeypatch, batch_size):
    from sahs.guard.jsonl import guard_jsonl

    dataset = exported[3]
    texts = [dataset[i]["text"] for i in (0, 1, 4)]
    guard = guard_for(exported, model_and_processor, batch_size=batch_size)
    expected = guard.generate([{"text": t} for t in texts], max_new_tokens=2)
    real = guard.generate

    def failing(prompts, **kwargs):
        if any(p["text"] == "boom" for p in prompts):
            raise RuntimeError("CUDA out of memory (stands for any failure inside generate)")
        return real(prompts, **kwargs)

    monkeypatch.setattr(guard, "generate", failing)
    lines = [{"id": "a", "text": texts[0]}, {"id": "b", "text": "boom"}, {"id": "c", "text": texts[1]},
             {"id": "d", "text": texts[2]}]
    sink = io.StringIO()
    counts = guard_jsonl(guard, io.StringIO("".join(json.dumps(line) + "\n" for line in lines)), sink, max_new_tokens=2)
    out = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c", "d"] and (counts.answered, counts.failed) == (3, 1)
    assert "generation failed (RuntimeError: CUDA out of memory" in out[1]["error"] and "score" not in out[1]
    for got, want in zip([out[0], out[2], out[3]], expected):  # alone or in another batch: other padding
        assert got["score"] == pytest.approx(want.score, abs=1e-5) and got["answer"] == want.answer


@pytest.mark.parametrize("option, value", [("--batch_size", "0"), ("--max_new_tokens", "0"), ("--batch_size", "-3")])
def test_an_option_that_cannot_work_is_one_line_before_the_model_loads(exported, tmp_path, capsys, monkeypatch,
                                                                       option, value):
    import sahs.guard.guard as guard_module

    monkeypatch.setattr(guard_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "p.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(SystemExit) as verdict:
        main(["guard", "--detector", str(exported[0]), "--input", str(tmp_path / "p.jsonl"), option, value])
    err = capsys.readouterr().err.strip()
    assert verdict.value.code == 2 and err.count("\n") == 0 and option.lstrip("-") in err


def test_a_score_that_is_not_a_number_is_flagged_and_reported(exported, model_and_processor, tmp_path):
    """A NaN reaching the heads (an fp16 overflow, a broken kernel) must refuse, not let the prompt through."""
    model, _ = model_and_processor
    dataset = exported[3]
    out_proj = find_adapter(model).out_projs[HEADS[0][0]]
    handle = out_proj.register_forward_pre_hook(lambda module, args: (torch.full_like(args[0], float("nan")),))
    try:
        guard = guard_for(exported, model_and_processor, threshold=2.0)  # nothing real would be flagged
        results = guard.generate(as_prompts(dataset, [0, 1]), max_new_tokens=2)
    finally:
        handle.remove()
    assert all(r.flagged and r.answer == guard.refusal and r.error for r in results)
    with pytest.raises(GuardSettingError, match="threshold must be a finite number"):
        guard_for(exported, model_and_processor, threshold=float("nan"))  # a NaN threshold would flag nothing
    line = json.dumps(results[0].to_dict(), allow_nan=False)  # strict JSON
    assert json.loads(line)["score"] is None and "nan" in json.loads(line)["error"]


def test_a_score_equal_to_the_threshold_is_flagged(exported, model_and_processor):
    dataset = exported[3]
    prompt = as_prompts(dataset, [5])
    (first,) = guard_for(exported, model_and_processor, threshold=2.0).generate(prompt, max_new_tokens=1)
    (at,) = guard_for(exported, model_and_processor, threshold=first.score).generate(prompt, max_new_tokens=1)
    (above,) = guard_for(exported, model_and_processor, threshold=float(torch.nextafter(
        torch.tensor(first.score), torch.tensor(2.0)))).generate(prompt, max_new_tokens=1)
    assert at.score == first.score and at.flagged and not above.flagged


def test_a_detector_for_another_model_named_on_the_command_line_refuses(exported, tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "fine"}\n')
    edited = tmp_path / "other"
    artifact = DetectorArtifact.load(exported[0])  # a well-formed export, written for another model's config
    fingerprint = json.loads(json.dumps(artifact.features.fingerprint))
    fingerprint["model"]["config_sha256"] = "0" * 64
    dataclasses.replace(artifact, features=dataclasses.replace(artifact.features, fingerprint=fingerprint)).save(edited)
    with pytest.raises(DetectorMismatchError, match="config_sha256"):
        main(["guard", "--detector", str(edited), "--input", str(tmp_path / "ok.jsonl")])
