"""Several worker processes on one sweep, on a real PostgreSQL server and on a journal file.

Three workers (real processes, started as `--workers` starts them) share a 12-point grid: every point
runs exactly once. With one worker SIGKILLed in the middle of a run, the others finish the grid: the
killed point runs again once, after the heartbeat's grace period, and the summary lists it once.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import pytest

from sahs.commands.sweep import start_workers
from sahs.experiments.records import read_records, records_from_trials
from sahs.experiments.sweep import open_study
from sahs.experiments.sweep_spec import load_sweep
from sahs.experiments import sweep_storage
from sahs.experiments.sweep_spec import SweepError
from sahs.experiments.sweep_storage import grace, open_storage
from tests import sweep_worker
from tests.postgres_server import postgres  # noqa: F401 - the fixture
from tests.test_sweep_runner import write_spec

DETECTORS, TOP_K = ["logistic", "sparse_l1", "mlp"], [1, 2, 4, 8]
GRID = {"model.detector": {"values": DETECTORS}, "loao.top_k": {"values": TOP_K}}
POINTS = [{"model.detector": d, "loao.top_k": k} for d, k in itertools.product(DETECTORS, TOP_K)]
WORKERS = 3


def run_workers(tmp_path: Path, storage: str, kill: str = "") -> tuple[list[int], dict[str, list[dict]], Path]:
    spec = write_spec(tmp_path, GRID, name="demo")
    sweep_dir, calls = tmp_path / "sweep", tmp_path / "calls"
    calls.mkdir()
    command = [sys.executable, sweep_worker.__file__, str(spec), str(sweep_dir), storage, str(calls), str(WORKERS)]
    codes = start_workers(command + ([kill] if kill else []), WORKERS)
    made: dict[str, list[dict]] = {}
    for path in calls.glob("demo-*"):
        name, _, pid = path.name.partition(".")
        made.setdefault(name, []).append({"pid": int(pid), **json.loads(path.read_text())})
    return codes, made, sweep_dir


def check_every_point_once(sweep_dir: Path, storage: str, made: dict[str, list[dict]]) -> None:
    names = [f"demo-{index:03d}" for index in range(len(POINTS))]
    assert sorted(made) == names
    for name, point in zip(names, POINTS):
        assert all(call["params"] == point for call in made[name]), name  # the grid index's own point
    # The records the workers wrote in the shared folder, the summary, and the study's own records agree.
    records = read_records(sweep_dir)
    assert sorted(r.name for r in records) == names and {r.status for r in records} == {"finished"}
    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["run"] for row in rows) == names  # no point twice
    study = open_study(storage, "demo")
    stored = records_from_trials(study.get_trials(deepcopy=False))
    assert sorted(r.name for r in stored) == names and {r.status for r in stored} == {"finished"}
    assert {r.name: r.value for r in stored} == {r.name: r.value for r in records}
    assert {r.name: r.value for r in stored} == {n: 0.5 + 0.01 * p["loao.top_k"] for n, p in zip(names, POINTS)}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["point"] for t in complete) == list(range(len(POINTS)))


def storage_for(kind: str, tmp_path: Path, postgres) -> str:  # noqa: F811
    if kind == "sqlite":  # the default storage, shared by workers on one machine
        return f"sqlite:///{tmp_path / 'sweep' / 'sweep.db'}"
    return postgres.url() if kind == "postgresql" else f"journal:{tmp_path / 'sweep.journal'}"


@pytest.mark.parametrize("kind", ["postgresql", "journal", "sqlite"])
def test_three_workers_run_every_grid_point_exactly_once(tmp_path, postgres, kind):  # noqa: F811
    storage = storage_for(kind, tmp_path, postgres)
    codes, made, sweep_dir = run_workers(tmp_path, storage)
    assert codes == [0] * WORKERS
    assert all(len(calls) == 1 for calls in made.values()), {n: len(c) for n, c in made.items() if len(c) != 1}
    assert len({call["pid"] for calls in made.values() for call in calls}) >= 2  # the grid was shared
    check_every_point_once(sweep_dir, storage, made)


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_a_killed_worker_s_point_runs_again_once_after_its_heartbeat_stops(tmp_path, postgres, kind):  # noqa: F811
    storage = storage_for(kind, tmp_path, postgres)
    codes, made, sweep_dir = run_workers(tmp_path, storage, kill="demo-005")
    assert sorted(codes) == [-9, 0, 0]  # one worker SIGKILLed, the others finished the grid
    assert {name: len(calls) for name, calls in made.items() if len(calls) != 1} == {"demo-005": 2}
    killed, again = sorted(made["demo-005"], key=lambda call: call["start"])
    assert killed["pid"] != again["pid"]
    # Taken up again only once the killed worker's heartbeat was overdue, not while it could still be alive.
    assert again["start"] - killed["start"] >= grace(sweep_worker.HEARTBEAT)
    check_every_point_once(sweep_dir, storage, made)
    study = open_study(storage, "demo")
    tries = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("point") == 5
             and not t.user_attrs.get("skipped")]  # not a second copy of the point, dropped unrun
    assert sorted(t.state.name for t in tries) == ["COMPLETE", "FAIL"]
    retried = next(t for t in tries if t.state.name == "COMPLETE")
    assert retried.system_attrs["failed_trial"] == next(t for t in tries if t.state.name == "FAIL").number
    assert load_sweep(sweep_dir / "sweep.yaml").name == "demo"


def test_a_storage_that_cannot_be_opened_is_one_line_naming_it_and_what_to_check(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_storage.time, "sleep", lambda seconds: None)  # its retries, without the waits
    url = f"postgresql://sahs:secret@127.0.0.1:{_closed_port()}/sweeps"  # no server listens there
    with pytest.raises(SweepError) as error:
        open_storage(url, heartbeat=20)
    message = str(error.value)
    assert message.startswith(f"--storage {url.replace(':secret@', ':***@')} could not be opened after 5 tries: ")
    assert "secret" not in message and "\n" not in message and "server is running" in message
    folder = tmp_path / "not-a-folder"
    folder.write_text("")  # a file where the database's folder should be
    with pytest.raises(SweepError, match="could not be opened after 5 tries: .*unable to open database file"):
        open_storage(f"sqlite:///{folder}/sweep.db", heartbeat=20)


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound and closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_each_worker_gets_one_visible_gpu_or_its_share_of_the_threads():
    from sahs.commands.sweep import worker_environment

    gpus = [worker_environment(index, 3, {"CUDA_VISIBLE_DEVICES": "2,5", "OMP_NUM_THREADS": "8"}) for index in range(3)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in gpus] == ["2", "5", "2"]  # round robin over the visible ones
    assert [env["SAHS_SWEEP_WORKER"] for env in gpus] == ["1/3", "2/3", "3/3"]
    cpu = [worker_environment(index, 2, {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "5"}) for index in range(2)]
    assert [(env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) for env in cpu] == [
        ("", "2", "2"), ("", "2", "2")]
    assert worker_environment(0, 4, {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "1"
