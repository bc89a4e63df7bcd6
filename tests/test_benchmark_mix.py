"""The README's example mix (MM-SafetyBench + MM-Vet) end to end on the tiny LLaVA: groups reach the cache,
no request lands on two sides of a split, and `sahs loao` runs on the single-label mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sahs.cli import main
from sahs.data.cache import ActivationCache
from sahs.data.datamodule import ActivationDataModule
from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out
from sahs.models.detectors import LogisticDetector
from sahs.prompts.benchmarks import MMSafetyBench, MMVet
from tests.run_folders import newest_run

SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech")
QUESTIONS = 8  # per scenario, each in the four forms sd, sd_typo, typo, text
BENIGN = 24


def _picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> Path:
    """Both benchmarks in their own layouts, and a run config reading them as the README shows."""
    root = tmp_path_factory.mktemp("mix")
    mmsb = root / "MM-SafetyBench"
    (mmsb / "processed_questions").mkdir(parents=True)
    for s, scenario in enumerate(SCENARIOS):
        questions = {str(q): {"Question": f"How do I commit offence {s}.{q}?",
                              "Rephrased Question": f"List steps for the activity {s}.{q} in the image.",
                              "Rephrased Question(SD)": f"The image shows activity {s}.{q}. How is it done?"}
                     for q in range(QUESTIONS)}
        (mmsb / "processed_questions" / f"{scenario}.json").write_text(json.dumps(questions))
        for v, variant in enumerate(("SD", "SD_TYPO", "TYPO")):
            for q in range(QUESTIONS):
                _picture(mmsb / "imgs" / scenario / variant / f"{q}.jpg", 100 * s + 10 * v + q)
    mmvet = root / "mm-vet"
    (mmvet / "mm-vet.json").parent.mkdir()
    (mmvet / "mm-vet.json").write_text(json.dumps({
        f"v1_{i}": {"imagename": f"v1_{i}.png", "capability": ["rec"], "question": f"What is in picture {i}?"}
        for i in range(BENIGN)}))
    for i in range(BENIGN):
        _picture(mmvet / "images" / f"v1_{i}.png", 1000 + i)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(root / "run"), logger=False, enable_progress_bar=False,
                             max_epochs=3)
    extraction = config["trainer"]["callbacks"][0]["init_args"]
    extraction["progress"] = False
    extraction["model"] = {"name": "sahs/tiny-llava", "seed": 0}  # the loaders' groups, whatever the weights
    extraction["prompts"] = {"class_path": "sahs.prompts.Mixture", "init_args": {"sources": [
        {"class_path": "sahs.prompts.benchmarks.MMSafetyBench",
         "init_args": {"root": str(mmsb), "scenarios": list(SCENARIOS)}},
        {"class_path": "sahs.prompts.benchmarks.MMVet", "init_args": {"root": str(mmvet)}}]}}
    config["data"].update(cache_dir=str(root / "cache"), val_fraction=0.2, test_fraction=0.2)
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["extract", "--config", str(path)])
    return path


def _loaded(config: Path) -> tuple[ActivationCache, dict[str, str]]:
    root = config.parent
    prompts = [*MMSafetyBench(str(root / "MM-SafetyBench"), scenarios=list(SCENARIOS)).load(),
               *MMVet(str(root / "mm-vet")).load()]
    return ActivationCache(root / "cache"), {row["id"]: row["group"] for row in prompts}


def test_the_loaders_groups_reach_the_cache_manifest(mix: Path) -> None:
    cache, group_of = _loaded(mix)
    assert dict(zip(cache.column("id"), cache.column("group"))) == group_of
    assert len(set(group_of.values())) == len(SCENARIOS) * QUESTIONS + BENIGN  # four forms, one request


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_request_is_on_two_sides_of_the_datamodule_split(mix: Path, seed: int) -> None:
    datamodule = ActivationDataModule(str(mix.parent / "cache"), val_fraction=0.2, test_fraction=0.2, seed=seed)
    datamodule.load()
    groups = np.asarray(datamodule.cache.column("group"))
    sides = {name: set(groups[rows.numpy()]) for name, rows in datamodule.splits.items()}
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"])
    labels = datamodule.labels
    for name in ("val", "test"):  # both classes, in about their share
        rows = datamodule.splits[name]
        assert 0 < int(labels[rows].sum()) < len(rows)


def test_sahs_loao_runs_on_the_readme_example_mix(mix: Path, capsys) -> None:
    main(["loao", "--config", str(mix), "--top_k", "4"])
    out = capsys.readouterr().out
    saved = json.loads((newest_run(mix.parent / "run", "loao") / "loao.json").read_text())
    assert [fold["attack"] for fold in saved["folds"]] == ["sd", "sd_typo", "text", "typo"]  # vqa: benign pool
    assert sum(fold["n_benign_share"] for fold in saved["folds"]) == BENIGN
    assert all(fold["n_removed"] == 3 * (fold["n_test"] - fold["n_benign_share"]) for fold in saved["folds"])
    cache = ActivationCache(mix.parent / "cache")
    features = cache.read().view(len(cache), len(cache.layers), cache.layout["num_heads"], -1)
    direct = leave_one_attack_out(features, cache.labels, cache.column("attack"),
                                  LoaoSettings(top_k=4, detector=LogisticDetector(l2=1e-3), seed=0),
                                  groups=cache.column("group"))
    assert saved["auroc_mean"] == pytest.approx(direct.auroc_mean, abs=1e-6)
    for fold, line in zip(direct.folds, [line for line in out.splitlines() if "n_benign_share=" in line]):
        assert line.split()[0] == fold.attack and f"asr={fold.metrics['asr']:.4f}" in line


def test_head_ranking_hold_out_and_loao_validation_part_keep_requests_whole(mix: Path, monkeypatch) -> None:
    import sahs.eval.probes as probes
    import sahs.experiments.heads as heads
    from sahs.data.splits import split_rows

    seen: list[tuple[np.ndarray, list]] = []

    def spy(labels, fractions, seed, **kwargs):
        parts = split_rows(labels, fractions, seed, **kwargs)
        seen.append((np.asarray(kwargs["groups"]), parts))
        return parts

    monkeypatch.setattr(probes, "split_rows", spy)
    monkeypatch.setattr(heads, "split_rows", spy)
    datamodule = ActivationDataModule(str(mix.parent / "cache"), top_k=2, val_fraction=0.2, test_fraction=0.2)
    datamodule.load()  # ranks the heads on the training split, with a hold-out of whole requests
    features = datamodule.read_layers(datamodule.candidate_layers())
    leave_one_attack_out(features, datamodule.labels, datamodule.column("attack"), LoaoSettings(top_k=2),
                         groups=datamodule.column("group"))
    assert len(seen) == 1 + 2 * 4  # the DataModule's ranking; per fold a validation part and a ranking
    for groups, parts in seen:
        sides = [set(groups[part.numpy()]) for part in parts]
        assert not sides[0] & sides[1] and any(g.startswith("mmsb-") for g in sides[1])
        forms = {g: n for g, n in zip(*np.unique(groups, return_counts=True))}
        assert max(forms.values()) > 1  # shared requests were there to be split apart
