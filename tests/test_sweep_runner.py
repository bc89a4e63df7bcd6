"""The offline sweep engine on its own: W&B semantics on Optuna, resume after Ctrl-C, records and summary.

Runs here are a stand-in ``execute`` whose metric is a fixed function of the parameters, so an
interrupted-and-resumed sweep can be compared with an uninterrupted one run by run.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import socket
from dataclasses import replace
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


def test_other_overrides_are_another_sweep_refused_before_any_run(tmp_path):
    spec = load_sweep(write_spec(tmp_path, GRID))
    run_local(spec, tmp_path / "sweep", Runs(tmp_path / "sweep"), overrides=["--data.seed", "0"], count=2,
              say=lambda line: None)
    other = Runs(tmp_path / "sweep")
    with pytest.raises(SweepError, match=r"overrides \['--data.seed=0'\], now \['--data.seed=1'\].*--name"):
        run_local(spec, tmp_path / "sweep", other, overrides=["--data.seed=1"], say=lambda line: None)
    assert other.calls == []  # refused before any run
    # The same overrides spelled otherwise, or another output folder, are the same sweep: it resumes.
    same = Runs(tmp_path / "sweep")
    run_local(spec, tmp_path / "sweep", same, overrides=["--data.seed=0", "--trainer.default_root_dir", "elsewhere"],
              say=lambda line: None)
    assert len(same.calls) == 4 and finished(tmp_path / "sweep") == {
        tuple(sorted({"model.detector": d, "loao.top_k": k}.items())): score({"model.detector": d, "loao.top_k": k})
        for d in ("logistic", "mlp") for k in (1, 2, 4)}


class BrokenConsole(Runs):
    """A run whose progress line meets a closed pipe (the sweep's output under `| tee`, after Ctrl-C)."""

    def __call__(self, params: dict, name: str) -> RunOutcome:
        if len(self.calls) == 1:
            self.calls.append(dict(params))
            raise BrokenPipeError(32, "Broken pipe")
        return super().__call__(params, name)


def test_a_broken_console_interrupts_the_sweep_without_a_failed_point(tmp_path):
    spec = load_sweep(write_spec(tmp_path, GRID))
    with pytest.raises(BrokenPipeError):
        run_local(spec, tmp_path / "sweep", BrokenConsole(tmp_path / "sweep"), say=lambda line: None)
    assert [(r.name, r.status) for r in read_records(tmp_path / "sweep")] == [("s-000", "finished"),
                                                                             ("s-001", "interrupted")]
    again = Runs(tmp_path / "sweep")
    run_local(spec, tmp_path / "sweep", again, say=lambda line: None)
    assert len(again.calls) == 5 and again.calls.count({"model.detector": "logistic", "loao.top_k": 2}) == 1
    records = read_records(tmp_path / "sweep")
    assert {r.status for r in records} == {"finished"}
    # Run names follow grid indices: the point interrupted as s-001 finished as s-001.
    assert {r.name: (r.params["model.detector"], r.params["loao.top_k"]) for r in records} == {
        f"s-{index:03d}": (d, k) for index, (d, k) in enumerate((d, k) for d in ("logistic", "mlp") for k in (1, 2, 4))}


class Warns(Runs):
    def __call__(self, params: dict, name: str) -> RunOutcome:
        import warnings

        for _ in range(3):
            warnings.warn("fold 1: stopped at max_iter=300", UserWarning)
        print("fold 1/3 ...")
        return super().__call__(params, name)


def test_a_run_s_warnings_and_output_go_to_its_record_and_folder_not_the_console(tmp_path, capsys):
    spec = load_sweep(write_spec(tmp_path, {"loao.top_k": {"values": [1, 2]}}))
    run_local(spec, tmp_path / "sweep", Warns(tmp_path / "sweep"))
    printed = capsys.readouterr()
    assert printed.err == "" and "fold 1/3" not in printed.out
    assert [line.split()[1:4] for line in printed.out.splitlines()] == [["s", "1/2", "s-000"], ["s", "2/2", "s-001"]]
    for record in read_records(tmp_path / "sweep"):
        assert record.warnings == {"UserWarning: fold 1: stopped at max_iter=300": 3}
        assert (Path(record.dir) / "sweep_run.log").read_text() == "fold 1/3 ...\n"


def test_two_workers_of_a_random_sweep_stop_at_run_cap_together(tmp_path, monkeypatch):
    monkeypatch.setattr("sahs.experiments.sweep._alive", lambda pid: True)  # two workers in this one process
    spec = load_sweep(write_spec(tmp_path, {"loao.top_k": {"distribution": "int_uniform", "min": 1, "max": 64}},
                                 method="random", run_cap=5))
    first, second = LocalSweep(spec, tmp_path / "sweep"), LocalSweep(spec, tmp_path / "sweep")
    held = [first.next_trial(), second.next_trial(), first.next_trial()]  # three runs going at once
    started = 3
    for sweep in itertools.cycle([second, first]):
        picked = sweep.next_trial(wait=False)
        if picked is None:
            break
        started += 1
        held.append(picked)
    assert started == 5
    assert first.next_trial(wait=False) is None and second.next_trial(wait=False) is None
    # A trial asked past the cap by a worker that looked before the others asked is dropped, not run.
    late = first.study.ask()
    assert first._claim(late, first.study.get_trials(deepcopy=False)) is None
    assert late.user_attrs["skipped"] == "past run_cap"


@pytest.mark.parametrize("parameters, message", [
    ({"loao.top_k": {"distribution": "int_uniform", "min": 1, "max": math.inf}}, "must be finite numbers"),
    ({"model.detector.init_args.l2": {"distribution": "q_uniform", "min": 0, "max": 1, "q": "a"}}, "q > 0"),
])
def test_unbounded_ranges_get_one_line(tmp_path, capsys, parameters, message):
    from sahs.cli import main

    path = write_spec(tmp_path, parameters)
    with pytest.raises(SystemExit):
        main(["sweep", str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_a_run_config_given_to_sweep_gets_one_line(tmp_path, capsys):
    from sahs.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "data": {"cache_dir": "x"}, "model": {}}))
    with pytest.raises(SystemExit):
        main(["sweep", str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a run config, not a sweep definition" in error[0]
    assert f"sahs loao --config {path}" in error[0]


def test_report_keeps_the_name_of_a_sweep_started_with_name(tmp_path, capsys):
    from sahs.cli import main

    spec = replace(load_sweep(write_spec(tmp_path, GRID)), name="renamed")
    run_local(spec, tmp_path / "renamed", Runs(tmp_path / "renamed"), count=2, say=lambda line: None)
    (tmp_path / "renamed" / "summary.md").unlink()
    main(["sweep", "report", str(tmp_path / "renamed")])
    assert (tmp_path / "renamed" / "summary.md").read_text().startswith("# Sweep renamed\n")


def test_report_rebuilds_the_summary_from_the_storage_when_folders_are_not_shared(tmp_path, capsys):
    """Two workers on one journal, each with a sweep folder of its own: the report of either lists every run."""
    import shutil

    from sahs.cli import main

    spec = load_sweep(write_spec(tmp_path, GRID))
    storage = f"journal:{tmp_path / 'shared' / 'sweep.journal'}"
    run_local(spec, tmp_path / "node1", Runs(tmp_path / "node1"), count=2, storage=storage, say=lambda line: None)
    run_local(spec, tmp_path / "node2", Runs(tmp_path / "node2"), storage=storage, say=lambda line: None)
    assert len(read_records(tmp_path / "node1")) == 2  # each folder holds only its own runs
    shutil.rmtree(tmp_path / "node1" / "loao")  # and not even those run folders any more
    main(["sweep", "report", str(tmp_path / "node1")])  # the storage named in node1/sweep.json
    with open(tmp_path / "node1" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == [f"s-{index:03d}" for index in range(6)]
    assert [float(row["loao/auroc_mean"]) for row in rows] == [
        score({"model.detector": d, "loao.top_k": k}) for d in ("logistic", "mlp") for k in (1, 2, 4)]
    # A folder that never saw the sweep: its definition comes from the storage too.
    main(["sweep", "report", str(tmp_path / "elsewhere"), "--storage", storage, "--name", "s"])
    summary = (tmp_path / "elsewhere" / "summary.md").read_text()
    assert summary.startswith("# Sweep s\n") and "6 runs: 6 finished." in summary
