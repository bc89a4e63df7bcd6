"""Run a sweep in this process: every run is one call of ``execute`` (a LOAO run), recorded on disk.

Offline, the search engine is Optuna. Its study lives in ``<sweep dir>/sweep.db`` (SQLite): an
interrupted sweep resumes where it stopped without repeating finished runs, and several processes
(``sahs sweep`` started again, on the same folder) share one sweep. A grid visits every point once,
in W&B's order; ``random`` and ``bayes`` draw with Optuna's random and TPE samplers.

Online, the sweep is created on W&B and this process runs a W&B agent on it; other machines join
with ``wandb agent ENTITY/PROJECT/ID``.

Each run has a record ``<sweep dir>/runs/<run name>.json`` (parameters, status, folder, error), and
after each run the summary table and plot are written again (``sahs.experiments.report``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sahs.experiments.records import DEFINITION, RunRecord, read_records, write_atomic
from sahs.experiments.report import write_summary
from sahs.experiments.sweep_spec import SweepError, SweepSpec

STORAGE = "sweep.db"


@dataclass
class RunOutcome:
    """What a finished run hands back: its folder, the metrics it logged and its detector."""

    dir: Path
    metrics: dict[str, float]
    detector: str | None = None


class RunFailed(Exception):
    """A run that failed after its folder was made: the error, and where the run's files are."""

    def __init__(self, message: str, run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


Execute = Callable[[dict[str, Any], str], RunOutcome]  # (parameters, run name) -> outcome


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # a run of this very process cannot still be going when a sweep starts


def attempt(record: RunRecord, execute: Execute, spec: SweepSpec, sweep_dir: Path) -> float | None:
    """Run once and record the outcome: the metric, or None for a failed run (the error kept in the record)."""
    record.save(sweep_dir)
    try:
        outcome = execute(dict(record.params), record.name)
    except KeyboardInterrupt:
        record.status, record.error, record.finished = "interrupted", "interrupted (Ctrl-C)", time.time()
        record.save(sweep_dir)
        raise
    except Exception as error:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
        record.status, record.error, record.finished = "failed", f"{type(error).__name__}: {error}", time.time()
        run_dir = getattr(error, "run_dir", None)
        record.dir = None if run_dir is None else str(run_dir)
        record.save(sweep_dir)
        return None
    record.dir, record.finished = str(outcome.dir), time.time()
    record.metrics, record.detector = dict(outcome.metrics), outcome.detector
    if spec.metric not in outcome.metrics:
        record.status = "failed"
        record.error = f"the run logged no {spec.metric!r}; it logged {sorted(outcome.metrics)[:8]}..."
    else:
        record.status, record.value = "finished", float(outcome.metrics[spec.metric])
    record.save(sweep_dir)
    return record.value


def definition_digest(spec: SweepSpec) -> str:
    """What makes two sweep definitions the same sweep: method, metric, parameters, command."""
    keys = {key: spec.raw.get(key) for key in ("method", "metric", "parameters", "command")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LocalSweep:
    """The Optuna study behind an offline sweep, stored in ``<sweep dir>/sweep.db``."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.sweep_dir = spec, Path(sweep_dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # No fixed seed: a resumed or a second process must not draw the first one's sequence again.
        sampler = optuna.samplers.TPESampler() if spec.method == "bayes" else optuna.samplers.RandomSampler()
        self.study = optuna.create_study(storage=f"sqlite:///{self.sweep_dir / STORAGE}", study_name=spec.name,
                                         direction=spec.goal, sampler=sampler, load_if_exists=True)
        digest = definition_digest(spec)
        stored = self.study.user_attrs.get("definition")
        if stored is None:
            self.study.set_user_attr("definition", digest)
        elif stored != digest:
            raise SweepError(f"{self.sweep_dir} holds sweep {spec.name!r} with another definition than {spec.path}; "
                             "pass --name NEW to start a new sweep, or move that folder away")
        write_atomic(self.sweep_dir / DEFINITION, spec.path.read_text())  # what `sahs sweep report` reads
        self.points = spec.grid() if spec.method == "grid" else []
        self._recover()

    def _statuses(self) -> dict[int, str]:
        return {record.number: record.status for record in read_records(self.sweep_dir)}

    def _recover(self) -> None:
        """Runs left 'running' by a process that is gone (killed, machine restarted) count as interrupted."""
        from optuna.trial import TrialState

        records = {record.number: record for record in read_records(self.sweep_dir)}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
            if host == socket.gethostname() and pid is not None and not _alive(pid):
                record = records.get(trial.number)
                if record is not None and record.status == "running":
                    record.status, record.error = "interrupted", "its process ended before the run finished"
                    record.save(self.sweep_dir)
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)

    def _counted(self) -> list:
        """Trials that count as runs of the sweep: finished, failed with an error, running or queued.

        An interrupted run (Ctrl-C, or its process gone before it ended) does not count: it runs again.
        """
        from optuna.trial import TrialState

        statuses = self._statuses()
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state in states or (t.state == TrialState.FAIL and statuses.get(t.number) == "failed")]

    def next_trial(self):
        """The next trial and its parameters, or None when the grid is done or ``run_cap`` is reached."""
        from optuna.trial import TrialState

        counted = self._counted()
        if self.spec.run_cap is not None and len([t for t in counted if t.state != TrialState.WAITING]) >= self.spec.run_cap:
            return None
        if self.points:
            waiting = [t for t in counted if t.state == TrialState.WAITING]
            if not waiting:
                taken = {t.user_attrs.get("grid") for t in counted}
                free = [index for index in range(len(self.points)) if index not in taken]
                if not free:
                    return None
                point = self.points[free[0]]
                self.study.enqueue_trial({p.name: p.grid_choice(point[p.name]) for p in self.spec.parameters
                                          if p.distribution != "constant"}, user_attrs={"grid": free[0]})
        trial = self.study.ask()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        return trial, {p.name: p.suggest(trial) for p in self.spec.parameters}

    def progress(self, trial, done: int, count: int | None) -> str:
        """``grid point 3/20`` or ``run 3/10``: where this run stands."""
        if self.points:
            return f"grid point {trial.user_attrs.get('grid', 0) + 1}/{len(self.points)}"
        limits = [n for n in (count, self.spec.run_cap) if n is not None]
        return f"run {done + 1}" + (f"/{min(limits)}" if limits else "")


def run_local(spec: SweepSpec, sweep_dir: Path, execute: Execute, count: int | None = None,
              say: Callable[[str], None] = print) -> list[RunRecord]:
    """Run the sweep offline until the grid is done, ``run_cap`` is reached or ``count`` runs ran here."""
    from optuna.trial import TrialState

    sweep = LocalSweep(spec, sweep_dir)
    done = 0
    while count is None or done < count:
        picked = sweep.next_trial()
        if picked is None:
            break
        trial, params = picked
        record = RunRecord(f"{spec.name}-{trial.number:03d}", trial.number, params)
        shown = "  ".join(f"{name}={value}" for name, value in params.items())
        say(f"[sahs] sweep {spec.name}: {sweep.progress(trial, done, count)} {record.name}  {shown}")
        try:
            value = attempt(record, execute, spec, sweep.sweep_dir)
        except KeyboardInterrupt:
            sweep.study.tell(trial, state=TrialState.FAIL)
            write_summary(sweep.sweep_dir, spec)
            raise
        sweep.study.tell(trial, value) if value is not None else sweep.study.tell(trial, state=TrialState.FAIL)
        write_summary(sweep.sweep_dir, spec, plot=False)  # the table after every run, the plot at the end
        say(f"[sahs] sweep {spec.name}: {record.name} {record.status}"
            + (f"  {spec.metric}={value:.4f}" if value is not None else f"  ({record.error})"))
        done += 1
    write_summary(sweep.sweep_dir, spec)
    return read_records(sweep.sweep_dir)


def create_wandb_sweep(spec: SweepSpec) -> str:
    """Create the sweep on W&B; returns its ``ENTITY/PROJECT/ID``."""
    import wandb

    sweep_id = wandb.sweep({**spec.raw, "name": spec.name}, project=spec.project, entity=spec.entity)
    entity = spec.entity or wandb.Api().default_entity
    return f"{entity}/{spec.project}/{sweep_id}"


def run_wandb(spec: SweepSpec, sweep_dir: Path, execute: Execute, sweep_id: str, count: int | None = None,
              say: Callable[[str], None] = print) -> list[RunRecord]:
    """Run a W&B agent in this process on the W&B sweep ``sweep_id`` (``ENTITY/PROJECT/ID``)."""
    import wandb

    sweep_dir = Path(sweep_dir)
    write_atomic(sweep_dir / DEFINITION, spec.path.read_text())
    if sweep_id.count("/") != 2:
        raise SweepError(f"--sweep_id {sweep_id!r} must be ENTITY/PROJECT/ID, as `wandb agent` takes it")
    say(f"[sahs] sweep {spec.name} runs on W&B; other machines join it with:\n  wandb agent {sweep_id}")
    numbers = itertools.count(len(read_records(sweep_dir)))

    def one_run() -> None:
        run = wandb.init(project=spec.project, entity=spec.entity, group=spec.name, job_type=spec.verb,
                         dir=str(sweep_dir))
        params = {p.name: run.config[p.name] if p.name in run.config else p.values[0] for p in spec.parameters
                  if p.name in run.config or p.distribution == "constant"}
        record = RunRecord(f"{spec.name}-{run.id}", next(numbers), params)
        run.name = record.name
        say(f"[sahs] sweep {spec.name}: run {record.number + 1} {record.name}  "
            + "  ".join(f"{name}={value}" for name, value in params.items()))
        try:
            with warnings.catch_warnings():  # the run's W&B logger joins the agent's run, as it should
                warnings.filterwarnings("ignore", "There is a wandb run already in progress")
                attempt(record, execute, spec, sweep_dir)
        finally:
            write_summary(sweep_dir, spec, plot=False)

    entity, project, short_id = sweep_id.split("/")
    try:
        wandb.agent(short_id, function=one_run, count=count, project=project, entity=entity)
    finally:
        write_summary(sweep_dir, spec)
    return read_records(sweep_dir)
