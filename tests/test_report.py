"""Sweep summaries: paired differences to the best run, interval columns, and plots a user can read."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgba
from sklearn.metrics import roc_auc_score

from sahs.eval.intervals import Part, bootstrap_mean_auroc, paired_difference
from sahs.experiments.records import METRICS_FILE, RunRecord
from sahs.experiments.report import summary_rows, write_summary
from sahs.experiments.sweep_plots import (PARALLEL_PLOT, PARAMS_PLOT, PLOT, detector_color, plot_auroc_vs_heads,
                                          plot_parallel, rounded)
from sahs.experiments.sweep_spec import load_sweep

FOLDS = ("figstep", "hades", "qr")


def fold_rows(requests: int = 70, size: int = 2, seed: int = 0):
    """Test rows of three folds: requests of ``size`` prompts sharing a label."""
    rng = np.random.default_rng(seed)
    out = []
    for index, fold in enumerate(FOLDS):
        labels = np.repeat(rng.permutation(np.arange(requests) % 2), size)
        groups = np.repeat([f"{fold}-q{i}" for i in range(requests)], size)
        rows = np.arange(len(labels)) + index * len(labels)
        out.append((fold, rows, labels, groups))
    return out


def scored(layout, strength: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [strength * labels + rng.standard_normal(len(labels)) for _, _, labels, _ in layout]


def write_run(sweep_dir: Path, name: str, number: int, layout, scores, params: dict, detector: str,
              not_converged: int = 0, with_scores: bool = True) -> float:
    """A finished run's record and folder: scores.csv in the agreed columns and metrics.json. Returns its mean."""
    folder = sweep_dir / "loao" / name
    folder.mkdir(parents=True)
    if with_scores:
        with open(folder / "scores.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["fold", "row", "id", "group", "label", "score"])
            for (fold, rows, labels, groups), values in zip(layout, scores):
                writer.writerows([fold, r, f"p{r}", g, int(y), repr(float(s))]
                                 for r, g, y, s in zip(rows, groups, labels, values))
    aurocs = [roc_auc_score(labels, values) for (_, _, labels, _), values in zip(layout, scores)]
    mean, _ = bootstrap_mean_auroc([Part.of(s, l, g) for (_, _, l, g), s in zip(layout, scores)], n_boot=200)
    metrics = {**mean.as_dict("loao/auroc_mean"), "loao/auroc_min": min(aurocs), "loao/num_heads_mean": 4.0,
               "loao/folds_not_converged": not_converged}
    metrics.update({f"loao/{fold}/auroc": a for (fold, *_), a in zip(layout, aurocs)})
    (folder / METRICS_FILE).write_text(json.dumps(metrics))
    RunRecord(name, number, params, status="finished", dir=str(folder), metrics=metrics, detector=detector,
              started=float(number)).save(sweep_dir)
    return float(np.mean(aurocs))


def sweep_spec(tmp_path: Path, method: str = "grid"):
    path = tmp_path / "definition.yaml"
    path.write_text(yaml.safe_dump({
        "name": "capacity", "method": method, "metric": {"name": "loao/auroc_mean", "goal": "maximize"},
        "parameters": {"model.detector.init_args.l2": {"values": [0.1, 0.01]}, "loao.top_k": {"values": [4]}},
        "command": ["${program}", "loao", "--config", "run.yaml", "${args}"]}))
    return load_sweep(path)


@pytest.fixture
def sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    layout = fold_rows()
    good, twin, bad = scored(layout, 1.6, 1), scored(layout, 1.6, 2), scored(layout, 0.5, 3)
    means = {
        "good": write_run(sweep_dir, "good", 0, layout, good, {"model.detector.init_args.l2": 0.1},
                          "LogisticDetector(l2=0.1)"),
        "twin": write_run(sweep_dir, "twin", 1, layout, twin, {"model.detector.init_args.l2": 0.1000000000000123},
                          "LogisticDetector(l2=0.1000000000000123)"),
        "bad": write_run(sweep_dir, "bad", 2, layout, bad, {"model.detector.init_args.l2": 0.01},
                         "MLPDetector(l2=0.01)", not_converged=2),
    }
    other = [(fold, rows[:-2], labels[:-2], groups[:-2]) for fold, rows, labels, groups in layout]
    l2 = {"model.detector.init_args.l2": 0.01}
    means["other_rows"] = write_run(sweep_dir, "other_rows", 3, other, [s[:-2] for s in bad], l2, "MLPDetector()")
    means["no_scores"] = write_run(sweep_dir, "no_scores", 4, layout, bad, l2, "MLPDetector()", with_scores=False)
    RunRecord("broken", 5, {}, status="failed", error="ValueError: top_k", started=5.0).save(sweep_dir)
    parts = {name: [Part.of(s, l, g) for (_, _, l, g), s in zip(layout, scores)]
             for name, scores in (("good", good), ("twin", twin), ("bad", bad))}
    return sweep_dir, means, parts


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def test_the_summary_names_the_best_run_and_each_run_s_paired_difference_to_it(sweep, tmp_path) -> None:
    sweep_dir, means, parts = sweep
    write_summary(sweep_dir, sweep_spec(tmp_path), plot=False)
    rows = read_rows(sweep_dir / "summary.csv")
    best = max(means, key=means.get)
    assert best in ("good", "twin") and rows[best]["vs_best"] == "best" and float(rows[best]["diff_to_best"]) == 0
    tie = "twin" if best == "good" else "good"
    for name in (tie, "bad"):
        assert float(rows[name]["diff_to_best"]) == pytest.approx(means[name] - means[best], abs=1e-12)
        expected = paired_difference(parts[name], parts[best], n_boot=1000, seed=0)
        assert (float(rows[name]["diff_ci_low"]), float(rows[name]["diff_ci_high"])) == pytest.approx(
            (expected.low, expected.high), abs=1e-12)
    assert float(rows["bad"]["diff_ci_high"]) < 0 and rows["bad"]["vs_best"] == "lower"
    assert float(rows[tie]["diff_ci_low"]) <= 0 <= float(rows[tie]["diff_ci_high"])
    assert rows[tie]["vs_best"] == "not distinguishable"
    assert rows["other_rows"]["vs_best"] == "not compared: other test rows" and rows["other_rows"]["diff_to_best"] == ""
    assert rows["no_scores"]["vs_best"] == "not compared: no scores.csv"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["vs_best"] == ""
    assert [rows[name]["not_converged"] for name in ("good", "bad")] == ["0", "2"]
    saved = json.loads((sweep_dir / "loao" / best / METRICS_FILE).read_text())
    assert float(rows[best]["loao/auroc_mean_ci_low"]) == saved["loao/auroc_mean_ci_low"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert f"Best: `{best}` with loao/auroc_mean = {means[best]:.4f} [" in markdown
    assert f"Not distinguishable from the best: `{tie}`." in markdown


def test_a_sweep_of_runs_without_a_loao_mean_is_summarized_by_its_own_metric(tmp_path) -> None:
    """`sahs fit` sweeps log `val/auroc`, no LOAO mean: the best run is named by the metric it was chosen on."""
    spec = sweep_spec(tmp_path)
    spec = replace(spec, metric="val/auroc")
    sweep_dir = tmp_path / "fit-sweep"
    for number, value in enumerate((0.71, 0.83)):
        RunRecord(f"fit-{number}", number, {"loao.top_k": 4}, status="finished", dir=str(tmp_path),
                  metrics={"val/auroc": value}, value=value, started=float(number)).save(sweep_dir)
    write_summary(sweep_dir, spec, plot=False)
    rows = read_rows(sweep_dir / "summary.csv")
    assert rows["fit-1"]["vs_best"] == "best" and float(rows["fit-0"]["val/auroc"]) == 0.71
    assert "Best: `fit-1` with val/auroc = 0.8300 (" in (sweep_dir / "summary.md").read_text()


def test_a_run_whose_scores_change_is_compared_again(sweep, tmp_path) -> None:
    sweep_dir, means, parts = sweep
    spec = sweep_spec(tmp_path)
    write_summary(sweep_dir, spec, plot=False)
    assert read_rows(sweep_dir / "summary.csv")["bad"]["vs_best"] == "lower"
    layout = fold_rows()
    (sweep_dir / "loao" / "bad" / "scores.csv").unlink()
    (sweep_dir / "loao" / "bad").rename(sweep_dir / "old-bad")
    better = [s + 3.0 * l for s, (_, _, l, _) in zip(scored(layout, 1.6, 1), layout)]
    write_run(sweep_dir, "bad", 2, layout, better, {"model.detector.init_args.l2": 0.01}, "MLPDetector(l2=0.01)")
    write_summary(sweep_dir, spec, plot=False)
    rows = read_rows(sweep_dir / "summary.csv")
    assert rows["bad"]["vs_best"] == "best" and float(rows["good"]["diff_ci_high"]) < 0


def test_sahs_sweep_report_prints_the_best_run_and_those_it_cannot_tell_apart(sweep, tmp_path, capsys) -> None:
    from sahs.commands.sweep import report

    sweep_dir, means, _ = sweep
    (sweep_dir / "sweep.yaml").write_text(sweep_spec(tmp_path).path.read_text())
    report([str(sweep_dir)])
    printed = capsys.readouterr().out
    best = max(means, key=means.get)
    tie = "twin" if best == "good" else "good"
    assert f"[sahs] best: {best}  loao/auroc_mean={means[best]:.4f}" in printed
    assert f"not distinguishable from it (paired bootstrap, 95%): {tie}\n" in printed


def test_a_report_from_the_folders_keeps_working_from_the_records(sweep, tmp_path) -> None:
    sweep_dir, means, _ = sweep
    spec = sweep_spec(tmp_path)
    (sweep_dir / "sweep.yaml").write_text(spec.path.read_text())
    written = write_summary(sweep_dir, from_folders=True)
    assert sweep_dir / PLOT in written
    rows = summary_rows(sweep_dir, spec.metric)
    assert {row["run"]: row["loao/auroc_mean"] for row in rows if row["status"] == "finished"} == pytest.approx(means)


def test_detectors_keep_their_class_colour_and_legends_round_long_numbers(sweep, tmp_path) -> None:
    assert detector_color("LogisticDetector(l2=0.1)") == detector_color("LogisticDetector()") == "C0"
    assert detector_color("SparseL1Detector(l1=0.01, group_lasso=True)") != detector_color("SparseL1Detector(l1=0.01)")
    assert detector_color("MLPDetector(hidden=[64])") == detector_color("MLPDetector(hidden=[128, 128])")
    assert detector_color("NewDetector()") == detector_color("NewDetector(a=1)")
    assert rounded("l2=0.0001234567890123, width=64") == "l2=0.000123, width=64"
    sweep_dir, means, _ = sweep
    rows = [row for row in summary_rows(sweep_dir) if row["status"] == "finished"]
    figure = plot_auroc_vs_heads(rows, "capacity", grid=True)
    axes = figure.axes[0]
    labels = [text.get_text() for text in figure.legends[0].texts]
    assert "LogisticDetector(l2=0.1) mean" in labels and not any("0000000" in label for label in labels)
    for line in axes.get_lines():
        if line.get_label().startswith("LogisticDetector"):
            assert to_rgba(line.get_color()) == to_rgba("C0")
    assert len(axes.collections) == len({row["detector"] for row in rows})  # one interval band per line


def test_a_random_sweep_is_plotted_against_each_parameter_and_in_parallel_coordinates(sweep, tmp_path) -> None:
    sweep_dir, means, _ = sweep
    spec = sweep_spec(tmp_path, method="random")
    written = write_summary(sweep_dir, spec)
    assert {PLOT, PARAMS_PLOT, PARALLEL_PLOT} <= {path.name for path in written}
    rows = summary_rows(sweep_dir)
    params = [p.name for p in spec.parameters]
    figure = plot_parallel(rows, "capacity", params)
    finished = [row for row in rows if row["status"] == "finished"]
    drawn = [line for line in figure.axes[0].get_lines() if len(line.get_xdata()) > 2]
    assert len(drawn) == len(finished)  # one line per finished run, through heads, l2 and the metric
    top = max(drawn, key=lambda line: line.get_ydata()[-1])  # the metric axis: the best run at the top
    assert top.get_ydata()[-1] == pytest.approx(1.0)
