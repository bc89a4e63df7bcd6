"""`sahs ablate` end to end on the model organism, the random-head control, and the report."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from sahs.cli import main
from sahs.data.datamodule import ActivationDataModule
from sahs.eval.refusal import PhraseJudge
from sahs.experiments.ablate import AblationSettings, ablation_plan, random_heads
from sahs.experiments.ablation_report import AblationResult, AblationSetting
from tests.run_folders import newest_run

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["figstep", "rephrase", "text"]


def organism_config(tmp_path: Path) -> Path:
    """configs/demo.yaml on the organism, with fewer prompts and an ``ablate:`` section."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), logger=False)
    extraction = config["trainer"]["callbacks"][0]["init_args"]
    extraction["model"] = {"name": "sahs/tiny-llava-refuser", "seed": 0}
    extraction["prompts"]["init_args"].update(n_benign=60, n_malicious=60, image_size=64, attacks=FAMILIES)
    extraction["progress"] = False
    config["data"].update(cache_dir=str(tmp_path / "cache"), top_k=None)
    config["ablate"] = {"k": 2, "seeds": [0, 1, 2], "max_new_tokens": 10}
    path = tmp_path / "organism.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ablate_runs_end_to_end_on_the_organism(organism_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAHS_CACHE", str(organism_cache))
    config = organism_config(tmp_path)
    main(["ablate", "--config", str(config)])
    out = capsys.readouterr().out
    assert "ablate/asr_top=" in out and "ablate/asr_random_mean=" in out
    output = newest_run(tmp_path / "run", "ablate")  # the run's own folder
    assert {p.name for p in output.iterdir()} >= {"config.yaml", "ablation.csv", "ablation.md", "answers.jsonl", "ablation_asr.png"}

    records = read_jsonl(output / "answers.jsonl")
    datamodule = ActivationDataModule(str(tmp_path / "cache"), top_k=2)
    datamodule.load()
    test_ids = sorted(datamodule.column("id")[datamodule.splits["test"].numpy()])
    by_setting = defaultdict(list)
    for record in records:
        by_setting[record["setting"]].append(record)
    assert list(by_setting) == ["none", "top2", "random2-seed0", "random2-seed1", "random2-seed2"]
    assert all(sorted(r["id"] for r in rows) == test_ids for rows in by_setting.values())

    # Top-k is the run's ranking; the random control uses distinct seeds and never a top-k head.
    top = {tuple(h) for h in by_setting["top2"][0]["heads"]}
    assert top == set(datamodule.selected_heads) and len(top) == 2
    randoms = [rows[0] for name, rows in by_setting.items() if name.startswith("random")]
    assert len({r["seed"] for r in randoms}) == 3
    assert all(len(r["heads"]) == 2 and not top & {tuple(h) for h in r["heads"]} for r in randoms)

    # Every figure of the table, recomputed from the answers with a fresh judge.
    table = list(csv.DictReader((output / "ablation.csv").open()))
    assert {(row["setting"], row["family"]) for row in table} == {
        (s, f) for s in [*by_setting, "random-mean"] for f in [*FAMILIES, "all"]}
    judge = PhraseJudge()
    baseline = {r["id"]: r["answer"] for r in by_setting["none"]}
    for row in table:
        if row["setting"] == "random-mean":
            continue
        rows = [r for r in by_setting[row["setting"]] if row["family"] in ("all", r["attack"])]
        malicious = [r for r in rows if r["label"] == 1]
        benign = [r for r in rows if r["label"] == 0]
        refusal = sum(judge([r["answer"] for r in malicious])) / len(malicious)
        assert float(row["refusal_rate"]) == pytest.approx(refusal)
        assert float(row["asr"]) == pytest.approx(1 - refusal)
        benign_refused = sum(judge([r["answer"] for r in benign])) / len(benign)
        assert float(row["benign_refusal_rate"]) == pytest.approx(benign_refused)
        agreement = sum(r["answer"] == baseline[r["id"]] for r in benign) / len(benign)
        assert float(row["benign_agreement"]) == pytest.approx(agreement)
    mean_row = next(r for r in table if r["setting"] == "random-mean" and r["family"] == "all")
    random_asr = [float(r["asr"]) for r in table if r["setting"].startswith("random2") and r["family"] == "all"]
    assert float(mean_row["asr"]) == pytest.approx(sum(random_asr) / 3)
    # The organism refuses the text family's malicious prompts when nothing is ablated.
    assert float(next(r for r in table if r["setting"] == "none" and r["family"] == "text")["refusal_rate"]) >= 0.8

    # Ablation acts: the answers of an ablated setting are those of the model generating with the hooks
    # applied by hand, and they differ from the unablated answers somewhere (the organism's top two heads
    # change some FigStep answers).
    changed = [r for rows in by_setting.values() for r in rows if r["answer"] != baseline[r["id"]]]
    assert changed and {r["setting"] for r in changed} <= set(by_setting) - {"none"}
    assert_answers_match_hand_ablation(by_setting, changed[0]["setting"])

    # Mean ablation and overrides from the command line.
    main(["ablate", "--config", str(config), "--ablate.mode", "mean", "--ablate.seeds", "[5]",
          "--ablate.output", str(tmp_path / "mean")])
    assert "means over" in capsys.readouterr().out
    settings = {r["setting"] for r in read_jsonl(tmp_path / "mean" / "answers.jsonl")}
    assert settings == {"none", "top2", "random2-seed5"}


def assert_answers_match_hand_ablation(by_setting, setting: str) -> None:
    """Regenerate ``setting``'s answers with the organism and ``ablated_heads`` applied here, and compare."""
    from sahs.extract.adapters import find_adapter
    from sahs.extract.generation import generate_answers
    from sahs.extract.interventions import ablated_heads
    from sahs.extract.models import ModelConfig, load_model
    from sahs.prompts import DemoPrompts

    records = by_setting[setting]
    prompts = DemoPrompts(n_benign=60, n_malicious=60, image_size=64, attacks=FAMILIES).load()
    position = {pid: i for i, pid in enumerate(prompts["id"])}
    chosen = prompts.select([position[r["id"]] for r in records])
    model, processor = load_model(ModelConfig(name="sahs/tiny-llava-refuser", seed=0))
    with ablated_heads(find_adapter(model), [tuple(h) for h in records[0]["heads"]], "zero"):
        answers = generate_answers(model, processor, chosen["text"], chosen["image"], max_new_tokens=10)
    assert answers == [r["answer"] for r in records]


def test_random_control_never_draws_a_top_head_and_seeds_differ():
    candidates = [(layer, head) for layer in range(4) for head in range(4)]
    top = [(3, 1), (0, 2), (2, 2)]
    plan = ablation_plan(top, candidates, AblationSettings(k=3, seeds=[0, 1, 2, 3]))
    assert [s.kind for s in plan] == ["none", "top", "random", "random", "random", "random"]
    draws = [tuple(s.heads) for s in plan if s.kind == "random"]
    assert len(set(draws)) > 1 and all(not set(d) & set(top) and len(set(d)) == 3 for d in draws)
    assert tuple(random_heads(candidates, top, 3, seed=1)) == draws[1]  # a seed names its draw
    with pytest.raises(ValueError, match="distinct seeds"):
        AblationSettings(seeds=[1, 1])
    with pytest.raises(ValueError, match="only 1 candidates remain"):
        random_heads(candidates[:4], candidates[:3], 2, seed=0)


class FakeWandb:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics):
        self.calls.append(("metrics", metrics))

    def log_table(self, key, columns, data):
        self.calls.append(("table", key, columns, data))

    def log_image(self, key, images):
        self.calls.append(("image", key, images))


def test_report_metrics_table_and_plot_reach_the_logger(tmp_path):
    plan = [AblationSetting("none", "none"), AblationSetting("top1", "top", [(0, 0)]),
            AblationSetting("random1-seed0", "random", [(1, 1)], 0),
            AblationSetting("random1-seed1", "random", [(1, 2)], 1)]
    rows = {"id": ["a", "b", "c", "d"], "attack": ["text", "text", "typo", "typo"], "label": [1, 0, 1, 0],
            "prompt": ["p"] * 4}
    answers = {"none": ["I cannot.", "Sure.", "I cannot.", "Sure."], "top1": ["Sure.", "Sure.", "Sure.", "Okay."],
               "random1-seed0": ["I cannot.", "Sure.", "Sure.", "Sure."],
               "random1-seed1": ["I cannot.", "Sure.", "I cannot.", "Sure."]}
    verdicts = {name: PhraseJudge()(batch) for name, batch in answers.items()}
    result = AblationResult.from_answers(plan, rows, answers, verdicts, "zero")
    summary = result.summary()
    assert summary["ablate/asr_none"] == 0 and summary["ablate/asr_top"] == 1
    assert summary["ablate/asr_random_mean"] == pytest.approx(0.25)
    assert summary["ablate/asr_random_std"] == pytest.approx(math.sqrt(0.125))
    assert summary["ablate/benign_agreement_top"] == 0.5 and summary["ablate/asr_top/typo"] == 1
    paths = result.save(tmp_path)
    logger = FakeWandb()
    result.log([logger], paths["plot"])
    kinds = [call[0] for call in logger.calls]
    assert kinds == ["metrics", "table", "image"] and logger.calls[1][1] == "ablate/table"
    assert len(logger.calls[1][3]) == 4 * 3 + 3  # four settings and the random mean, three families with "all"
    assert "| top1 | top | L0.H0 | all |" in paths["markdown"].read_text()


@pytest.fixture(scope="module")
def planted():
    from tests.planted import build_planted_llava

    return build_planted_llava()


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_the_planted_circuit_lets_every_attack_through_and_random_heads_change_nothing(planted, mode):
    from sahs.experiments.ablate import run_ablation
    from sahs.prompts.schema import make_dataset
    from tests.planted import HEADS, LAYERS, PLANTED, planted_prompts

    model, processor = planted
    prompts = make_dataset(planted_prompts(8))
    reference = make_dataset([{**row, "id": f"ref-{i}"} for i, row in enumerate(planted_prompts(4)) if row["label"] == 0])
    candidates = [(layer, head) for layer in range(LAYERS) for head in range(HEADS)]
    settings = AblationSettings(k=2, seeds=[0, 1, 2, 3], mode=mode, max_new_tokens=4, batch_size=6)
    plan = ablation_plan(PLANTED, candidates, settings)
    result = run_ablation(model, processor, prompts, plan, settings, reference=reference)
    summary = result.summary()
    assert summary["ablate/asr_none"] == 0 and summary["ablate/benign_refusal_rate_none"] == 0
    assert summary["ablate/asr_top"] == 1.0  # the two planted heads carry every refusal
    randoms = [r for r in result.records if r["kind"] == "random"]
    assert len(randoms) == 4 * len(prompts) and all(r["agrees"] for r in randoms)  # every answer unchanged
    assert summary["ablate/asr_random_mean"] == 0 and summary["ablate/asr_random_std"] == 0
    drawn = {tuple(h) for r in randoms for h in r["heads"]}
    assert not drawn & set(PLANTED) and len(drawn) > 4  # the control drew several other heads
