"""Run a sweep in this process: every run is one call of ``execute`` (a LOAO run), recorded on disk and in the study.

Offline, the search engine is Optuna and the sweep is one study in a storage (``sweep_storage``): by
default ``<sweep dir>/sweep.db`` (SQLite), or any RDB URL or ``journal:PATH`` shared by workers on many
machines. Every process that runs the same sweep joins the study:

- a grid enqueues each point once, in W&B's order; a worker pops a waiting point atomically (Optuna's
  storages guarantee one popper), so each point runs once across all workers;
- ``random`` and ``bayes`` draw with Optuna's random and TPE samplers, and stop at ``run_cap`` trials
  of the whole study (a trial numbered past the cap is dropped, whoever asked for it);
- a run whose worker is gone (Ctrl-C, SIGKILL, node lost: its heartbeat stops) is failed and queued
  again under the same run name; only an error of the run itself makes a point ``failed``.

Each trial is one attempt at a point (user attrs ``point``, ``run``; a finished attempt also ``record``,
the run's record as JSON, so a summary can be rebuilt from the storage alone). Online, the sweep is
created on W&B and this process runs a W&B agent on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sahs.experiments.records import DEFINITION, RUN_LOG, SWEEP_FILE, RunRecord, read_records, write_atomic
from sahs.experiments.report import write_summary
from sahs.experiments.sweep_spec import SweepError, SweepSpec
from sahs.experiments.sweep_storage import Heartbeat, fail_lost, open_storage, redact, requeue

STORAGE = "sweep.db"
HEARTBEAT = 20  # seconds between a running trial's heartbeats; lost after three missed ones
SUMMARY_EVERY = 5.0  # seconds: the summary table is rewritten after a run at most this often (and at the end)
LOCAL_ONLY = ("--trainer.default_root_dir",)  # overrides that move outputs but change no result


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
INTERRUPTIONS = (KeyboardInterrupt, BrokenPipeError)  # the sweep stopped, or its own output broke (`| tee`)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # a run of this very process cannot still be going when it asks for the next


def attempt(record: RunRecord, execute: Execute, spec: SweepSpec, sweep_dir: Path) -> float | None:
    """Run once and record the outcome: the metric, or None for a failed run (the error kept in the record).

    The run's console output (stdout and stderr) goes to ``<run folder>/sweep_run.log`` and its warnings
    are counted in the record, once each, instead of on the sweep's console.
    """
    record.save(sweep_dir)
    printed, cpu = io.StringIO(), time.process_time()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed), \
                contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            try:
                outcome = execute(dict(record.params), record.name)
            finally:
                record.cpu = round(time.process_time() - cpu, 3)
                for warning in caught:
                    text = f"{warning.category.__name__}: {warning.message}"
                    record.warnings[text] = record.warnings.get(text, 0) + 1
    except INTERRUPTIONS as error:
        record.status, record.finished = "interrupted", time.time()
        record.error = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else "the sweep's output broke"
        record.save(sweep_dir)
        raise
    except Exception as error:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
        record.status, record.error, record.finished = "failed", f"{type(error).__name__}: {error}", time.time()
        run_dir = getattr(error, "run_dir", None)
        record.dir = None if run_dir is None else str(run_dir)
        _keep_log(record, printed)
        record.save(sweep_dir)
        return None
    record.dir, record.finished = str(outcome.dir), time.time()
    record.metrics, record.detector = dict(outcome.metrics), outcome.detector
    if spec.metric not in outcome.metrics:
        record.status = "failed"
        record.error = f"the run logged no {spec.metric!r}; it logged {sorted(outcome.metrics)[:8]}..."
    else:
        record.status, record.value = "finished", float(outcome.metrics[spec.metric])
    _keep_log(record, printed)
    record.save(sweep_dir)
    return record.value


def _keep_log(record: RunRecord, printed: io.StringIO) -> None:
    if record.dir and Path(record.dir).is_dir() and printed.getvalue():
        (Path(record.dir) / RUN_LOG).write_text(printed.getvalue())


def _normalized(overrides: list[str]) -> list[str]:
    """``--key value`` and ``--key=value`` alike, without the overrides that only move outputs."""
    out, index = [], 0
    while index < len(overrides):
        arg = overrides[index]
        if arg.startswith("--") and "=" not in arg and index + 1 < len(overrides) and \
                not overrides[index + 1].startswith("--"):
            arg, index = f"{arg}={overrides[index + 1]}", index + 1
        if not arg.startswith(LOCAL_ONLY):
            out.append(arg)
        index += 1
    return out


def sweep_identity(spec: SweepSpec, overrides: list[str] = ()) -> str:
    """What makes two sweeps the same sweep: method, metric, parameters, command and the run overrides."""
    keys = {key: spec.raw.get(key) for key in ("method", "metric", "parameters", "command")}
    keys["overrides"] = _normalized(list(overrides))
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def definition_digest(spec: SweepSpec) -> str:
    """The identity of a sweep started without overrides (what sweeps before overrides counted stored)."""
    keys = {key: spec.raw.get(key) for key in ("method", "metric", "parameters", "command")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def storage_url(sweep_dir: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{Path(sweep_dir) / STORAGE}"


def open_study(storage: str, name: str, heartbeat: int = HEARTBEAT):
    """An existing sweep's study, to read (``sahs sweep report``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat))
    except KeyError:
        raise SweepError(f"{redact(storage)} holds no sweep named {name!r}; pass its --name") from None


def _kind(trial) -> str:
    """done | failed (the run's own error) | running | waiting | lost (runs again) | skipped."""
    state = trial.state.name
    if state in ("COMPLETE", "RUNNING", "WAITING"):
        return {"COMPLETE": "done", "RUNNING": "running", "WAITING": "waiting"}[state]
    if trial.user_attrs.get("skipped"):
        return "skipped"
    return "failed" if (trial.user_attrs.get("outcome") or {}).get("status") == "failed" else "lost"


class LocalSweep:
    """The Optuna study behind an offline sweep, shared by every worker that runs it."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, storage: str | None = None, overrides: list[str] = (),
                 heartbeat: int = HEARTBEAT) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        self.spec, self.sweep_dir, self.heartbeat = spec, Path(sweep_dir), int(heartbeat)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.url = storage_url(self.sweep_dir, storage)
        self.storage = open_storage(self.url, self.heartbeat)
        # No fixed seed: a resumed or a second process must not draw the first one's sequence again.
        sampler = optuna.samplers.TPESampler() if spec.method == "bayes" else optuna.samplers.RandomSampler()
        try:  # the process that creates the study queues the grid; the others wait for that, then join
            self.study = optuna.create_study(storage=self.storage, study_name=spec.name, direction=spec.goal,
                                             sampler=sampler)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(storage=self.storage, study_name=spec.name, sampler=sampler)
            created = False
        if not created:
            self._wait_for_creator()
        self._check_identity(sweep_identity(spec, overrides), _normalized(list(overrides)))
        write_atomic(self.sweep_dir / DEFINITION, spec.path.read_text())  # what `sahs sweep report` reads
        write_atomic(self.sweep_dir / SWEEP_FILE, json.dumps(
            {"name": spec.name, "storage": None if storage is None else redact(self.url)}, indent=1))
        points = spec.grid() if spec.method == "grid" else []
        self.points = points[:spec.run_cap] if spec.run_cap is not None else points
        self.host, self._checked = socket.gethostname(), -float("inf")
        self._heal()
        if created:
            self.study.set_user_attr("queued", len(self.points))

    def _wait_for_creator(self, seconds: float = 60.0) -> None:
        """A study just created by another worker: wait until it has queued the grid (else queue it here too)."""
        deadline = time.monotonic() + seconds
        while "queued" not in self.study.user_attrs and "definition" not in self.study.user_attrs and \
                time.monotonic() < deadline:
            time.sleep(0.2)

    def _check_identity(self, identity: str, overrides: list[str]) -> None:
        attrs = self.study.user_attrs
        if "identity" not in attrs and "definition" not in attrs:
            self.study.set_user_attr("identity", identity)
            self.study.set_user_attr("overrides", overrides)
            self.study.set_user_attr("definition_yaml", self.spec.path.read_text())
            return
        if attrs.get("identity", None) == identity or (
                "identity" not in attrs and not overrides and attrs["definition"] == definition_digest(self.spec)):
            return
        before = attrs.get("overrides", [])
        change = (f"it was started with overrides {before or 'none'}, now {overrides or 'none'}"
                  if before != overrides else f"it holds another definition than {self.spec.path}")
        raise SweepError(f"sweep {self.spec.name!r} in {redact(self.url)} is another sweep: {change}; pass "
                         "--name NEW to start a new sweep (or run it with the same definition and overrides)")

    # -- the study's trials, as points and attempts ------------------------------------------------------------

    def _attempts(self, trials) -> dict[int, list]:
        by_point: dict[int, list] = {}
        for trial in trials:
            if "point" in trial.user_attrs and _kind(trial) != "skipped":
                by_point.setdefault(trial.user_attrs["point"], []).append(trial)
        return by_point

    def _heal(self) -> None:
        """Queue every grid point that has no attempt, and again every point whose attempts were all lost."""
        trials = self.study.get_trials(deepcopy=False)
        by_point = self._attempts(trials)
        for point, tried in by_point.items():
            if all(_kind(t) == "lost" for t in tried) and (not self.points or point < len(self.points)):
                requeue(self.study, max(tried, key=lambda t: t.number))
        for index, values in enumerate(self.points):
            if index not in by_point:
                self.study.enqueue_trial({p.name: p.grid_choice(values[p.name]) for p in self.spec.parameters
                                          if p.distribution != "constant"},
                                         user_attrs={"point": index, "run": self.run_name(index)},
                                         skip_if_exists=False)

    def run_name(self, point: int) -> str:
        return f"{self.spec.name}-{point:03d}"

    def _skip(self, trial, why: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("skipped", why)
        self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def _dead(self, trials) -> list:
        """Running trials of this host whose process has ended (found at once, without waiting for the grace)."""
        workers = [(t, t.user_attrs.get("worker") or {}) for t in trials if t.state.name == "RUNNING"]
        return [t for t, worker in workers if worker.get("host") == self.host and not _alive(worker.get("pid", 0))]

    def next_trial(self, say: Callable[[str], None] = print, wait: bool = True):
        """The next attempt and its parameters, or None when every point is done or ``run_cap`` is reached.

        While other workers still run points (which may come back if their worker is lost), wait for them.
        """
        waited, pause = False, 0.1
        while True:
            trials = self.study.get_trials(deepcopy=False)
            dead = self._dead(trials)
            if dead or time.monotonic() - self._checked > self.heartbeat:  # lost runs: once per heartbeat
                fail_lost(self.study, self.heartbeat, dead=dead)
                self._checked = time.monotonic()
                trials = self.study.get_trials(deepcopy=False)
            kinds = [_kind(t) for t in trials]
            fresh = not self.points and (self.spec.run_cap is None or self._originals(trials) < self.spec.run_cap)
            if "waiting" not in kinds and not fresh:
                if "running" not in kinds or not wait:
                    return None
                if not waited:
                    say(f"[sahs] sweep {self.spec.name}: waiting for {kinds.count('running')} run(s) of other workers")
                    waited = True
                # Often at first (the last runs end within moments of each other), then every few seconds.
                time.sleep(pause)
                pause = min(2 * pause, self.heartbeat, 5)
                continue
            trial = self.study.ask()
            picked = self._claim(trial, trials)
            if picked is not None:
                return picked

    def _originals(self, trials, below: int | None = None) -> int:
        """Trials that started a point of a random or Bayesian sweep (not retries, not dropped)."""
        return sum(1 for t in trials if (below is None or t.number < below) and "failed_trial" not in t.system_attrs
                   and not t.user_attrs.get("skipped"))

    def _claim(self, trial, trials):
        """This process's attempt at ``trial``'s point, or None (a second copy of a point, or past ``run_cap``).

        ``trials``: the study as seen before asking. When it holds ``trial``, it holds every trial numbered
        below it (numbers only grow), which is all a second copy is checked against.
        """
        point = trial.user_attrs.get("point")
        if point is None:
            if self.points:  # the grid's queue emptied between looking and asking
                self._skip(trial, "no grid point left")
                return None
            point = trial.number
            if self.spec.run_cap is not None and self._originals(self.study.get_trials(deepcopy=False),
                                                                 below=trial.number) >= self.spec.run_cap:
                self._skip(trial, "past run_cap")
                return None
            trial.set_user_attr("point", point)
            trial.set_user_attr("run", self.run_name(point))
        else:
            if len(trials) <= trial.number:
                trials = self.study.get_trials(deepcopy=False)
            earlier = [t for t in self._attempts(trials).get(point, []) if t.number < trial.number and _kind(t) != "lost"]
            if earlier:  # queued twice (workers that started together, or two that found it lost): drop
                self._skip(trial, f"point {point} already taken by trial {earlier[0].number}")
                return None
        trial.set_user_attr("worker", {"host": self.host, "pid": os.getpid()})
        params = {p.name: p.suggest(trial) for p in self.spec.parameters}
        return trial, params, RunRecord(trial.user_attrs["run"], point, params)

    def tell(self, trial, record: RunRecord) -> None:
        """Store the attempt's outcome and record; an interrupted one is queued again for any worker."""
        from optuna.trial import TrialState

        from optuna.exceptions import UpdateFinishedTrialError

        try:
            trial.set_user_attr("outcome", {"status": record.status, "record": json.dumps(asdict(record), default=str)})
            if record.status == "finished":
                self.study.tell(trial, record.value, skip_if_finished=True)
                return
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except UpdateFinishedTrialError:  # this worker went silent past the grace period: its point was queued
            return  # again and runs again (its record in the folder is overwritten by that run's)
        if record.status == "interrupted":
            requeue(self.study, self.study._storage.get_trial(trial._trial_id))

    def progress(self, point: int, done: int, count: int | None) -> str:
        """``3/20`` (grid point 3 of 20) or ``3/10`` (run 3 of this process's count or the run_cap)."""
        if self.points:
            return f"{point + 1}/{len(self.points)}"
        limits = [n for n in (count, self.spec.run_cap) if n is not None]
        return f"{done + 1}" + (f"/{min(limits)}" if limits else "")


def _line(spec: SweepSpec, where: str, record: RunRecord, seconds: float) -> str:
    shown = "  ".join(f"{name}={value}" for name, value in record.params.items())
    result = f"{spec.metric}={record.value:.4f}" if record.value is not None else f"({record.error})"
    notes = f"  [{sum(record.warnings.values())} warnings, in its record]" if record.warnings else ""
    return f"[sahs] {spec.name} {where} {record.name} {record.status} {result} {seconds:.1f}s  {shown}{notes}"


def run_local(spec: SweepSpec, sweep_dir: Path, execute: Execute, count: int | None = None,
              say: Callable[[str], None] = print, storage: str | None = None, overrides: list[str] = (),
              heartbeat: int = HEARTBEAT, wait: bool = True) -> list[RunRecord]:
    """Run the sweep offline until every point is done, ``run_cap`` is reached or ``count`` runs ran here.

    One line per run on the console; the run's own output is in its folder.
    """
    sweep = LocalSweep(spec, sweep_dir, storage, overrides, heartbeat)
    done, written = 0, time.monotonic()
    while count is None or done < count:
        picked = sweep.next_trial(say, wait=wait)
        if picked is None:
            break
        trial, params, record = picked
        started = time.monotonic()
        try:
            with Heartbeat(sweep.storage, trial._trial_id, sweep.heartbeat):
                attempt(record, execute, spec, sweep.sweep_dir)
        except INTERRUPTIONS:
            sweep.tell(trial, record)
            write_summary(sweep.sweep_dir, spec)
            raise
        sweep.tell(trial, record)
        if time.monotonic() - written > SUMMARY_EVERY:  # the table now and then, the plot at the end
            write_summary(sweep.sweep_dir, spec, plot=False)
            written = time.monotonic()
        say(_line(spec, sweep.progress(record.number, done, count), record, time.monotonic() - started))
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
    write_atomic(sweep_dir / SWEEP_FILE, json.dumps({"name": spec.name, "storage": None}, indent=1))
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
        started = time.monotonic()
        try:
            with warnings.catch_warnings():  # the run's W&B logger joins the agent's run, as it should
                warnings.filterwarnings("ignore", "There is a wandb run already in progress")
                attempt(record, execute, spec, sweep_dir)
        finally:
            write_summary(sweep_dir, spec, plot=False)
        say(_line(spec, str(record.number + 1), record, time.monotonic() - started))

    entity, project, short_id = sweep_id.split("/")
    try:
        wandb.agent(short_id, function=one_run, count=count, project=project, entity=entity)
    finally:
        write_summary(sweep_dir, spec)
    return read_records(sweep_dir)
