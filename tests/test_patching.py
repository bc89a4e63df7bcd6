"""Activation patching: the planted circuit's heads come out on top and nothing else moves; report and pairs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml

from sahs.experiments.patching import (
    PatchingError,
    PatchSettings,
    answer_token,
    decision_tokens,
    make_pairs,
    run_patching,
)
from sahs.eval.intervals import bootstrap_means, spearman
from sahs.extract.formatting import encode_batch
from sahs.prompts.schema import make_dataset
from tests.planted import (
    COMPLIANCE,
    DECIDER,
    DETECTOR,
    HEAD_DIM,
    PLANTED,
    REFUSAL,
    build_planted_llava,
    planted_prompts,
)

OTHERS = [(layer, head) for layer in range(4) for head in range(4) if (layer, head) not in PLANTED]


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def planted():
    return build_planted_llava()


@pytest.fixture(scope="module")
def prompts():
    return make_dataset(planted_prompts(6))


def settings(**changes) -> PatchSettings:
    values = dict(refusal_tokens=[REFUSAL.strip()], compliance_tokens=[COMPLIANCE.strip()], batch_size=4, top_k=2,
                  max_new_tokens=0, progress=False, n_boot=200)
    return PatchSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def everywhere(planted, prompts):
    model, processor = planted
    pairs = make_pairs(prompts, range(len(prompts)), settings())
    return run_patching(model, processor, prompts, pairs, settings(max_new_tokens=3))


def manual_metric(model, processor, texts, layer=None, head=None, source=None, last_only=False):
    """The refusal logit difference of ``texts[0]`` with one head's o_proj input slice taken from ``texts[1]``,
    with a hand-written hook (both prompts in one left-padded batch, positions aligned from the end)."""
    inputs = encode_batch(processor, texts, [None, None], padding_side="left")
    tokenizer = processor.tokenizer
    refusal, compliance = tokenizer.convert_tokens_to_ids([REFUSAL, COMPLIANCE])
    handles, seen = [], {}
    o_proj = model.model.language_model.layers[layer].self_attn.o_proj if layer is not None else None
    if o_proj is not None:
        handles.append(o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0].clone())))
        with torch.no_grad():
            model(**inputs, use_cache=False)
        handles.pop().remove()
        z_source = seen["z"][1]  # [pos, width]: the twin's activation
        both = inputs["attention_mask"].bool().all(dim=0)
        if last_only:
            both = torch.zeros_like(both)
            both[-1] = True

        def hook(module, args):
            z = args[0].clone()
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            z[0, both, cols] = z_source[both, cols]
            return (z,)

        handles.append(o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(logits[refusal] - logits[compliance])


def test_the_planted_heads_alone_move_the_decision_and_every_other_head_is_zero(planted, prompts, everywhere):
    result = everywhere
    full = result.full_difference()
    assert (full > 9).all()  # the planted model refuses every malicious prompt by ~9.6 logits and complies with its twin
    assert set(result.top(2)) == set(PLANTED)
    for measure in ("effect", "effect_malicious", "effect_benign"):
        effects = result.effects(measure)  # [pairs, layers, heads]
        for layer, head in PLANTED:  # each alone carries all of it, in both directions (serial circuit)
            torch.testing.assert_close(effects[:, layer, head], full, rtol=0.01, atol=0)
        others = torch.stack([effects[:, layer, head] for layer, head in OTHERS])
        assert others.abs().max() <= 1e-6 * float(full.max())  # bit for bit in practice: zero o_proj blocks
    table = result.heads_table()
    assert {(r["layer"], r["head"]) for r in table[:2]} == set(PLANTED)
    assert all(abs(r["fraction"] - 1) < 0.01 and r["effect_ci_low"] <= r["effect"] <= r["effect_ci_high"]
               for r in table[:2])

    # One pair recomputed with a hand-written hook: the decider patched from the benign twin.
    model, processor = planted
    mal, ben = result.pair_ids[0]
    texts = [prompts[[i for i, pid in enumerate(prompts["id"]) if pid == name][0]]["text"] for name in (mal, ben)]
    clean = manual_metric(model, processor, texts)
    patched = manual_metric(model, processor, texts, *DECIDER)
    assert result.clean[0, 0] == pytest.approx(clean, abs=1e-4)
    assert result.patched[0, 0, DECIDER[0], DECIDER[1]] == pytest.approx(patched, abs=1e-4)


def test_path_patching_separates_the_direct_head_from_the_one_upstream(everywhere):
    direct, full = everywhere.effects("direct"), everywhere.full_difference()
    torch.testing.assert_close(direct[:, DECIDER[0], DECIDER[1]], full, rtol=0.01, atol=0)
    assert direct[:, DETECTOR[0], DETECTOR[1]].abs().max() < 0.01 * float(full.min())  # only through the norm's scale
    assert max(direct[:, layer, head].abs().max() for layer, head in OTHERS) == 0


def test_last_position_patching_and_its_independent_recomputation(planted, prompts):
    model, processor = planted
    pairs = make_pairs(prompts, range(len(prompts)), settings())[:3]
    result = run_patching(model, processor, prompts, pairs, settings(positions="last"))
    full = result.full_difference()
    torch.testing.assert_close(result.effects("effect")[:, DECIDER[0], DECIDER[1]], full, rtol=0.01, atol=0)
    # The detector's output at the last position alone turns a benign prompt into a refusal; for a malicious
    # one, the earlier positions still carry the harmful word to the decider.
    torch.testing.assert_close(result.effects("effect_benign")[:, DETECTOR[0], DETECTOR[1]], full, rtol=0.01, atol=0)
    assert result.effects("effect_malicious")[:, DETECTOR[0], DETECTOR[1]].abs().max() < 0.01 * float(full.min())
    texts = [prompts[pairs[1][0]]["text"], prompts[pairs[1][1]]["text"]]
    manual = manual_metric(model, processor, texts, *DETECTOR, last_only=True)
    assert result.patched[0, 1, DETECTOR[0], DETECTOR[1]] == pytest.approx(manual, abs=1e-4)


def test_judged_refusals_follow_the_patched_head(everywhere):
    rates = {row["patched"]: (row["malicious_refusal_rate"], row["benign_refusal_rate"]) for row in everywhere.generation}
    assert rates == {"none": (1.0, 0.0), "L1.H2": (0.0, 1.0), "L2.H1": (0.0, 1.0)}


def test_no_hook_is_left_after_patching_even_when_it_fails(planted, prompts):
    model, processor = planted
    before = hook_count(model)
    pairs = make_pairs(prompts, range(len(prompts)), settings())[:2]
    run_patching(model, processor, prompts, pairs, settings(max_new_tokens=2))
    assert hook_count(model) == before

    def judge(answers, prompts=None):
        assert hook_count(model) == before  # generation is over: no hook is active while judging
        raise RuntimeError("judge failed")

    with pytest.raises(RuntimeError, match="judge failed"):
        run_patching(model, processor, prompts, pairs, settings(max_new_tokens=2, judge=judge))
    assert hook_count(model) == before


def test_decision_tokens_are_the_first_answer_tokens_and_must_differ(planted):
    _, processor = planted
    tokenizer = processor.tokenizer
    assert answer_token(processor, REFUSAL.strip()) == tokenizer.convert_tokens_to_ids(REFUSAL)
    assert decision_tokens(processor, settings()) == ([tokenizer.convert_tokens_to_ids(REFUSAL)],
                                                      [tokenizer.convert_tokens_to_ids(COMPLIANCE)])
    with pytest.raises(PatchingError, match="begin with the same token"):
        decision_tokens(processor, settings(refusal_tokens=["No way"], compliance_tokens=["Nice"]))


def rows(spec):
    return [{"id": pid, "text": f"prompt {pid}", "image": None, "label": label, "attack": attack, "source": "s",
             "category": "c", "group": group}
            for pid, label, attack, group in spec]


def test_pairs_by_family_by_group_and_from_a_file(tmp_path):
    data = make_dataset(rows([("t-mal-1", 1, "text", "g1"), ("t-ben-1", 0, "text", "g1"), ("t-mal-0", 1, "text", "g2"),
                              ("t-ben-0", 0, "text", "g3"), ("f-mal-0", 1, "figstep", "g2"), ("f-ben-0", 0, "figstep", "g4"),
                              ("f-mal-1", 1, "figstep", "g5")]))
    ids = data["id"]
    named = lambda pairs: [(ids[m], ids[b]) for m, b in pairs]  # noqa: E731
    everything = range(len(data))
    assert named(make_pairs(data, everything, settings())) == [("f-mal-0", "f-ben-0"), ("t-mal-0", "t-ben-0"),
                                                                ("t-mal-1", "t-ben-1")]
    assert named(make_pairs(data, everything, settings(pairing="group"))) == [("t-mal-1", "t-ben-1")]
    assert named(make_pairs(data, [0, 1, 2], settings())) == [("t-mal-0", "t-ben-1")]  # only the rows given
    drawn = make_pairs(data, everything, settings(max_pairs=2, seed=3))
    assert len(drawn) == 2 and set(drawn) <= set(make_pairs(data, everything, settings()))
    with pytest.raises(PatchingError, match="no malicious/benign pair in a request group"):
        make_pairs(data, [2, 3], settings(pairing="group"))

    (tmp_path / "pairs.csv").write_text("malicious_id,benign_id\nf-mal-1,t-ben-0\n")
    assert named(make_pairs(data, [], settings(pairing="file", pairs_file=str(tmp_path / "pairs.csv")))) == [
        ("f-mal-1", "t-ben-0")]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"malicious_id": "t-ben-0", "benign_id": "t-mal-0"}) + "\n")
    with pytest.raises(PatchingError, match="row 1: 't-ben-0' must be malicious"):
        make_pairs(data, [], settings(pairing="file", pairs_file=str(tmp_path / "pairs.jsonl")))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"malicious_id": "nope", "benign_id": "t-ben-0"}) + "\n")
    with pytest.raises(PatchingError, match="no prompt with id 'nope'"):
        make_pairs(data, [], settings(pairing="file", pairs_file=str(tmp_path / "pairs.jsonl")))
    with pytest.raises(PatchingError, match="pairs_file goes with patch.pairing: file"):
        settings(pairs_file="x.csv")


def test_bootstrap_means_match_a_plain_loop_over_groups():
    rng = np.random.default_rng(1)
    values, groups = rng.normal(size=(9, 3)), np.array(list("aabbbcdde"))
    mean, low, high = bootstrap_means(values, groups, n_boot=50, seed=7, level=0.9)
    keys = sorted(set(groups))
    draws = np.random.default_rng(7).integers(0, len(keys), size=(50, len(keys)))
    replicates = []
    for draw in draws:
        picked = np.concatenate([values[groups == keys[j]] for j in draw])
        replicates.append(picked.mean(axis=0))
    np.testing.assert_allclose(mean, values.mean(axis=0))
    np.testing.assert_allclose(low, np.percentile(replicates, 5, axis=0))
    np.testing.assert_allclose(high, np.percentile(replicates, 95, axis=0))


def test_report_files_agree_and_feed_ablate_and_data(everywhere, tmp_path):
    from scipy.stats import spearmanr

    result = everywhere
    result.probe_auroc = torch.linspace(0.5, 1.0, 16).view(4, 4)  # a stand-in probe ranking: L3.H3 best
    paths = result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"patching.json", "patching.csv", "patching_heatmap.png",
                                                    "patching_vs_probe.png", "top_heads.yaml", "patching_answers.jsonl"}
    saved = json.loads(paths["json"].read_text())
    table = list(csv.DictReader(paths["csv"].open()))
    assert [(int(r["layer"]), int(r["head"])) for r in table] == result.ranking()
    assert [(r["layer"], r["head"]) for r in saved["heads"]] == result.ranking()
    effect = result.effects("effect").mean(dim=0).flatten().numpy()
    agreement = saved["agreement"]
    assert agreement["spearman"] == pytest.approx(spearmanr(result.probe_auroc.flatten(), effect).statistic)
    assert agreement["top_k_overlap"] == len({(3, 3), (3, 2)} & set(PLANTED)) == 0
    assert int(table[0]["probe_rank"]) == 16 - (4 * int(table[0]["layer"]) + int(table[0]["head"]))
    top = yaml.safe_load(paths["heads"].read_text())
    assert top["data"]["heads"] == top["ablate"]["heads"] == [list(h) for h in result.top(2)]
    answers = [json.loads(line) for line in paths["answers"].read_text().splitlines()]
    assert len(answers) == 3 * 2 * len(result.pair_ids) and answers[0]["id"] == result.pair_ids[0][0]
    assert math.isnan(spearman(np.array([1.0, 2, 3]), np.ones(3))) and spearman(np.arange(3.0), -np.arange(3.0)) == -1


@pytest.mark.slow
def test_patch_runs_end_to_end_on_the_organism_and_feeds_ablate(organism_cache, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from sahs.cli import main
    from sahs.extract.models import ModelConfig, load_model
    from sahs.prompts import DemoPrompts
    from tests.run_folders import newest_run

    monkeypatch.setenv("SAHS_CACHE", str(organism_cache))
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), logger=False)
    extraction = config["trainer"]["callbacks"][0]["init_args"]
    extraction["prompts"]["init_args"].update(n_benign=24, n_malicious=24, image_size=64, attacks=["text", "figstep"])
    extraction["progress"] = False
    config["data"].update(cache_dir=str(tmp_path / "cache"))
    config["patch"].update(max_pairs=8, max_new_tokens=4, n_boot=100, progress=False, top_k=2, batch_size=3)
    path = tmp_path / "organism.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["patch", "--config", str(path)])
    assert "agreement with the probe ranking: Spearman" in capsys.readouterr().out
    output = newest_run(tmp_path / "run", "patch")
    assert {p.name for p in output.iterdir()} >= {"config.yaml", "patching.json", "patching.csv", "patching_heatmap.png",
                                                  "patching_vs_probe.png", "top_heads.yaml", "head_ranking.json"}
    saved = json.loads((output / "patching.json").read_text())
    assert saved["pairs"] == 8 and [t["token"] for t in saved["tokens"]["refusal"]] == ["ĠI"]
    assert all(m.split("-")[1] == b.split("-")[1] and "-mal-" in m and "-ben-" in b for m, b in saved["pair_ids"])
    probe = json.loads((output / "head_ranking.json").read_text())
    auroc = {(r["layer"], r["head"]): r["probe_auroc"] for r in saved["heads"]}
    assert auroc == pytest.approx({(layer, head): value for layer, row in zip(probe["layers"], probe["auroc"])
                                   for head, value in enumerate(row)})

    # The top head's effect on malicious prompts, recomputed pair by pair with a hand-written hook.
    layer, head = saved["top_heads"][0]
    prompts = DemoPrompts(n_benign=24, n_malicious=24, image_size=64, attacks=["text", "figstep"]).load()
    position = {pid: i for i, pid in enumerate(prompts["id"])}
    model, processor = load_model(ModelConfig(name="sahs/tiny-llava-refuser", seed=0))
    refusal, compliance = saved["tokens"]["refusal"][0]["id"], saved["tokens"]["compliance"][0]["id"]
    width = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    o_proj = model.model.language_model.layers[layer].self_attn.o_proj
    drops = []
    for mal, ben in saved["pair_ids"]:
        pair = prompts.select([position[mal], position[ben]])
        inputs = encode_batch(processor, pair["text"], pair["image"], padding_side="left")
        seen = []
        handle = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        handle.remove()
        both = inputs["attention_mask"].bool().all(dim=0)
        cols = slice(head * width, (head + 1) * width)

        def patch(module, args):
            z = args[0].clone()
            z[0, both, cols] = seen[0][1, both, cols]
            return (z,)

        handle = o_proj.register_forward_pre_hook(patch)
        with torch.no_grad():
            patched = model(**inputs, use_cache=False).logits[0, -1]
        handle.remove()
        drops.append(float(logits[refusal] - logits[compliance] - (patched[refusal] - patched[compliance])))
    top = saved["heads"][0]
    assert top["effect_malicious"] == pytest.approx(float(np.mean(drops)), abs=1e-3)

    # top_heads.yaml feeds `sahs ablate`: its top setting ablates exactly those heads.
    main(["ablate", "--config", str(path), "--config", str(output / "top_heads.yaml"), "--ablate.seeds", "[0]",
          "--ablate.max_new_tokens", "2", "--ablate.output", str(tmp_path / "ablate")])
    records = [json.loads(line) for line in (tmp_path / "ablate" / "answers.jsonl").read_text().splitlines()]
    assert next(r["heads"] for r in records if r["setting"] == "top2") == sorted(saved["top_heads"])
