"""The offline sweep engine on its own: W&B semantics on Optuna, resume after Ctrl-C, records and summary.

Runs here are a stand-in ``execute`` whose metric is a fixed function of the parameters, so an
interrupted-and-resumed sweep can be compared with an uninterrupted one run by run.
"""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import pytest
import yaml

from sahs.experiments.records import read_records
from sahs.experiments.sweep import LocalSweep, RunOutcome, run_local
from sahs.experiments.sweep_spec import SweepError, load_sweep


def write_spec(folder: Path, parameters: dict, method: str = "grid", name: str = "s", **extra) -> Path:
    spec = {"name": name, "method": method, "metric": {"name": "loao/auroc_mean", "goal": "maximize"},
            "parameters": parameters, "command": ["${program}", "loao", "--config", "run.yaml", "${args}"],
            "program": "sahs", **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def score(params: dict) -> float:
    """A metric that differs for every grid point below."""
    return 0.5 + 0.01 * params.get("loao.top_k", 0) + (0.2 if params.get("model.detector") == "mlp" else 0.0)


class Runs:
    """A stand-in for `sahs loao`: writes a run folder with its metrics; can raise Ctrl-C on a given call."""

    def __init__(self, folder: Path, interrupt_at: int | None = None) -> None:
        self.folder, self.interrupt_at, self.calls = folder, interrupt_at, []

    def __call__(self, params: dict, name: str) -> RunOutcome:
        self.calls.append(dict(params))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        run_dir = self.folder / "loao" / name
        run_dir.mkdir(parents=True)
        metrics = {"loao/auroc_mean": score(params), "loao/auroc_min": score(params) - 0.1,
                   "loao/num_heads_mean": float(params.get("loao.top_k", 1)), "loao/text/auroc": score(params)}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return RunOutcome(run_dir, metrics, f"Detector({params.get('model.detector')})")


GRID = {"model.detector": {"values": ["logistic", "mlp"]}, "loao.top_k": {"values": [1, 2, 4]}}


def finished(sweep_dir: Path) -> dict[tuple, float]:
    return {tuple(sorted(r.params.items())): r.value for r in read_records(sweep_dir) if r.status == "finished"}


def test_an_interrupted_grid_resumes_without_repeating_a_finished_run(tmp_path):
    spec = load_sweep(write_spec(tmp_path, GRID))
    whole = Runs(tmp_path / "whole")
    run_local(spec, tmp_path / "whole", whole, say=lambda line: None)
    assert len(whole.calls) == 6

    first = Runs(tmp_path / "cut", interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tmp_path / "cut", first, say=lambda line: None)
    # Ctrl-C left a consistent summary: the two finished runs and the interrupted one, nothing half-written.
    with open(tmp_path / "cut" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["finished", "finished", "interrupted"]
    assert not list((tmp_path / "cut").rglob("*.partial*"))

    again = Runs(tmp_path / "cut")
    run_local(spec, tmp_path / "cut", again, say=lambda line: None)
    done_before = [tuple(sorted(call.items())) for call in first.calls[:2]]
    assert not {tuple(sorted(call.items())) for call in again.calls} & set(done_before)  # nothing repeated
    assert len(again.calls) == 4  # the interrupted point and the three never started
    assert finished(tmp_path / "cut") == finished(tmp_path / "whole")  # every point once, same results
    run_local(spec, tmp_path / "cut", Runs(tmp_path / "cut"), say=lambda line: None)  # a finished grid: no run
    records = read_records(tmp_path / "cut")  # one record per grid point, named by its index: s-002 ran again
    assert sorted(record.name for record in records) == [f"s-{index:03d}" for index in range(6)]


def test_a_run_left_running_by_a_dead_process_is_run_again(tmp_path):
    spec = load_sweep(write_spec(tmp_path, {"loao.top_k": {"values": [1, 2]}}))
    sweep = LocalSweep(spec, tmp_path / "sweep")
    trial, params, record = sweep.next_trial()
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2 ** 22 + 12345})  # a process that is gone
    runs = Runs(tmp_path / "sweep")
    run_local(spec, tmp_path / "sweep", runs, say=lambda line: None)
    assert sorted(call["loao.top_k"] for call in runs.calls) == [1, 2]


def test_the_grid_follows_w_and_b_order_and_count_limits_this_process(tmp_path):
    spec = load_sweep(write_spec(tmp_path, GRID))
    runs = Runs(tmp_path / "sweep")
    run_local(spec, tmp_path / "sweep", runs, count=4, say=lambda line: None)
    assert [(c["model.detector"], c["loao.top_k"]) for c in runs.calls] == [
        ("logistic", 1), ("logistic", 2), ("logistic", 4), ("mlp", 1)]


def test_a_changed_definition_in_the_same_folder_is_refused(tmp_path):
    run_local(load_sweep(write_spec(tmp_path, GRID)), tmp_path / "sweep", Runs(tmp_path / "sweep"), count=1,
              say=lambda line: None)
    changed = load_sweep(write_spec(tmp_path, {"loao.top_k": {"values": [8]}}))
    with pytest.raises(SweepError, match="another definition"):
        run_local(changed, tmp_path / "sweep", Runs(tmp_path / "sweep"), say=lambda line: None)


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_draw_inside_each_distribution(tmp_path, method):
    parameters = {"model.detector.init_args.l2": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
                  "loao.top_k": {"distribution": "int_uniform", "min": 1, "max": 16},
                  "loao.val_fraction": {"distribution": "q_uniform", "min": 0.1, "max": 0.5, "q": 0.1},
                  "model.detector": {"values": ["logistic", "mlp"]},
                  "loao.max_iter": {"value": 50}}
    spec = load_sweep(write_spec(tmp_path, parameters, method=method, run_cap=12))
    runs = Runs(tmp_path / "sweep")
    run_local(spec, tmp_path / "sweep", runs, say=lambda line: None)
    assert len(runs.calls) == 12  # run_cap
    for call in runs.calls:
        assert 1e-4 <= call["model.detector.init_args.l2"] <= 1e-1
        assert isinstance(call["loao.top_k"], int) and 1 <= call["loao.top_k"] <= 16
        assert math.isclose(round(call["loao.val_fraction"] / 0.1) * 0.1, call["loao.val_fraction"], abs_tol=1e-9)
        assert call["model.detector"] in ("logistic", "mlp") and call["loao.max_iter"] == 50
    exponents = [math.log10(call["model.detector.init_args.l2"]) for call in runs.calls]
    assert max(exponents) - min(exponents) > 1  # drawn on a log scale, not bunched at the top


@pytest.mark.parametrize("parameters, message", [
    ({"loao.top_k": {"distribution": "normal", "mu": 4, "sigma": 1}}, "normal"),
    ({"loao.top_k": {"min": 1, "max": 8, "distribution": "uniform"}}, "grid needs a finite set"),
    ({"loao.top_k": {"values": []}}, "non-empty"),
    ({"loao.top_k": {"vals": [1]}}, "unknown fields"),
])
def test_a_definition_that_cannot_run_names_the_parameter(tmp_path, parameters, message):
    with pytest.raises(SweepError, match=message) as error:
        load_sweep(write_spec(tmp_path, parameters))
    assert "loao.top_k" in str(error.value)


def test_a_command_that_is_not_loao_is_refused(tmp_path):
    path = write_spec(tmp_path, GRID)
    spec = yaml.safe_load(path.read_text())
    spec["command"] = ["${program}", "fit", "--config", "run.yaml", "${args}"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError, match="names \\['fit'\\]"):
        load_sweep(path)


def test_report_rebuilds_the_table_and_plot_from_the_run_folders(tmp_path, capsys):
    from sahs.cli import main

    spec = load_sweep(write_spec(tmp_path, GRID))
    run_local(spec, tmp_path / "sweep", Runs(tmp_path / "sweep"), say=lambda line: None)
    with open(tmp_path / "sweep" / "summary.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    for name in ("summary.csv", "summary.md", "auroc_vs_heads.png"):
        (tmp_path / "sweep" / name).unlink()
    first = Path(read_records(tmp_path / "sweep")[0].dir) / "metrics.json"
    first.write_text(json.dumps({**json.loads(first.read_text()), "loao/auroc_mean": 0.123}))
    main(["sweep", "report", str(tmp_path / "sweep")])
    with open(tmp_path / "sweep" / "summary.csv", newline="") as handle:
        rebuilt = list(csv.DictReader(handle))
    assert float(rebuilt[0]["loao/auroc_mean"]) == 0.123  # read from the run's folder, not the sweep's record
    assert rebuilt[1:] == written[1:] and {**rebuilt[0], "loao/auroc_mean": written[0]["loao/auroc_mean"]} == written[0]
    assert (tmp_path / "sweep" / "auroc_vs_heads.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sweep", "report", str(tmp_path)])
    assert "is not a sweep folder" in capsys.readouterr().err
