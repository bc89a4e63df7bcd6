"""Where an offline sweep's Optuna study lives, and how workers tell a live run from a lost one.

- ``sqlite:///PATH`` (the default, ``<sweep dir>/sweep.db``), ``postgresql://...``, ``mysql://...``: Optuna's
  ``RDBStorage`` with its own heartbeat (``heartbeat_interval``, ``grace_period``) and
  ``RetryFailedTrialCallback``: a run whose worker stops beating is failed and queued again.
- ``journal:PATH``: Optuna's ``JournalStorage`` on a ``JournalFileBackend`` (an append-only file, for a
  shared file system without a database server). Optuna has no heartbeat there, so the equivalent is
  kept here: each running trial carries a ``heartbeat`` system attribute (wall clock of its worker),
  and a trial whose beat is older than the grace period is failed and queued again the same way.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

BEAT = "heartbeat"  # system attribute of a running trial on a journal storage: its worker's last time.time()
JOURNAL = "journal:"


def grace(interval: int) -> int:
    """Seconds without a beat after which a running trial counts as lost: three missed beats."""
    return 3 * int(interval)


def redact(url: str) -> str:
    """The storage URL without its password, fit for a log line or a file."""
    if "://" not in url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"


def requeue(study, trial) -> None:
    """Queue ``trial``'s point again as a waiting trial (its parameters and user attrs), as Optuna retries."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial)


def open_storage(url: str, heartbeat: int):
    """An Optuna storage for ``url`` (an RDB URL or ``journal:PATH``) with lost runs queued again."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len(JOURNAL):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    sqlite = url.startswith("sqlite")
    # A server drops idle connections (a worker idles through a long run): renew them after 5 minutes, rather
    # than pinging the server before every statement.
    engine = {"connect_args": {"timeout": 60}} if sqlite else {"pool_recycle": 300}
    last = None
    for attempt in range(5):  # workers started together race to create the tables: the losers retry
        try:
            with warnings.catch_warnings():  # Optuna marks its heartbeat experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=int(heartbeat), grace_period=grace(heartbeat),
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None))
            break
        except ImportError as error:
            from sahs.experiments.sweep_spec import SweepError

            raise SweepError(f"--storage {redact(url)} needs its database driver: {error}; for PostgreSQL "
                             "`pip install 'sahs[postgres]'` (psycopg)") from None
        except Exception as error:  # noqa: BLE001 - a concurrent CREATE TABLE, or a server still starting
            last = error
            time.sleep(0.5 + attempt)
    else:
        from sahs.experiments.sweep_spec import SweepError

        reason = str(getattr(last, "orig", None) or last).strip().splitlines()[0]  # the driver's own words
        raise SweepError(f"--storage {redact(url)} could not be opened after 5 tries: {reason}; check that the "
                         "database server is running and the URL's host, port, user, password and database (or "
                         "the file's folder) are right") from last
    if sqlite:
        _write_ahead(storage.engine)
    return storage


def _write_ahead(engine) -> None:
    """SQLite for several processes: write-ahead mode, and every transaction takes the write lock at BEGIN.

    Python's sqlite3 starts a transaction only at the first write, so two workers could both read a grid
    point as waiting and both take it (Optuna's ``SELECT ... FOR UPDATE`` means nothing to SQLite);
    ``BEGIN IMMEDIATE`` serializes them. In write-ahead mode a commit is an append, not an fsync of the
    database (15 ms each here); a crash loses at most the last commits, never the database's consistency.
    """
    from sqlalchemy import event

    def connect(connection, _record) -> None:
        connection.isolation_level = None  # transactions as sqlalchemy begins them, below
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", connect)
    event.listen(engine, "begin", begin)
    engine.dispose()  # connections opened while the tables were made reconnect with these settings


def is_journal(storage) -> bool:
    from optuna.storages.journal import JournalStorage

    return isinstance(storage, JournalStorage)


class Heartbeat:
    """While a run goes on, record that its worker is alive every ``interval`` seconds (a thread)."""

    def __init__(self, storage, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sahs-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                if is_journal(self.storage):
                    self.storage.set_trial_system_attr(self.trial_id, BEAT, time.time())
                else:
                    self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a finished trial or a storage hiccup: the next beat tries again
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def fail_lost(study, heartbeat: int, dead: list | None = None) -> None:
    """Fail the running trials whose worker is gone and queue each again (once; a second copy is dropped at pop).

    Lost: no heartbeat within the grace period, or (``dead``) trials of this host whose process has ended.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    lost = list(dead or [])
    if is_journal(storage):
        now, limit = time.time(), grace(heartbeat)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(BEAT)  # a retry carries the lost attempt's last beat: count from its start
            if trial.datetime_start is not None:  # the journal keeps local time: read as such
                beat = max(beat or 0.0, trial.datetime_start.timestamp())
            if beat is not None and now - beat > limit:
                lost.append(trial)
    else:
        optuna.storages.fail_stale_trials(study)  # Optuna's own heartbeat check, and its retry callback
    for trial in {t._trial_id: t for t in lost}.values():
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker failed it first, and queued it
        requeue(study, storage.get_trial(trial._trial_id))
