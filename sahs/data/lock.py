"""One extraction at a time in a cache folder: an advisory file lock that dies with its holder.

The lock is ``flock`` on ``<cache>/.lock``. The kernel drops it when the holding process exits or is
killed, so a crashed or SIGKILLed extraction never leaves the folder locked, and there is no stale
lock file to clean up. One DDP job takes it once, on rank 0, for all its ranks: the others wait for
rank 0 at a barrier. The file also records who holds it (pid, host, start), for the message that a
waiting process prints.

On a shared file system the lock is as good as the file system's ``flock``: NFSv4 and most cluster file
systems support it across nodes (Lustre needs the ``flock`` mount option).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sahs.errors import UserError

LOCK_FILE = ".lock"
RECORD_BYTES = 256


class CacheBusyError(UserError, RuntimeError):
    """Another extraction holds the cache folder and the wait ran out."""


class CacheLock:
    """Exclusive use of a cache folder; ``timeout`` None waits as long as it takes, 0 refuses at once."""

    def __init__(self, root: str | os.PathLike[str], timeout: float | None = None, poll: float = 0.5):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.timeout, self.poll = timeout, poll
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, as written in the lock file by its holder."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> CacheLock:
        if self._fd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides the mode
        try:
            if not self._try(fd):
                self._wait(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        # Padded over the previous holder's record rather than truncated: ext4 flushes a file truncated to
        # zero when it is closed, which would cost milliseconds. JSON ignores the trailing spaces.
        record = json.dumps(info).encode().ljust(RECORD_BYTES)
        os.pwrite(fd, record, 0)
        if os.fstat(fd).st_size != len(record):  # a longer record of an earlier holder
            os.ftruncate(fd, len(record))
        return self

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait(self, fd: int) -> None:
        holder = self.holder()
        if self.timeout is not None and self.timeout <= 0:
            raise CacheBusyError(self._busy_message(holder))
        print(f"[sahs] waiting for another extraction into {self.root} to finish ({holder})", flush=True)
        if self.timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks in the kernel until the holder releases or dies
            return
        deadline = time.monotonic() + self.timeout
        while not self._try(fd):
            if time.monotonic() >= deadline:
                raise CacheBusyError(self._busy_message(holder))
            time.sleep(min(self.poll, max(deadline - time.monotonic(), 0.0)))

    def _busy_message(self, holder: str) -> str:
        waited = f"after waiting {self.timeout:g} s" if self.timeout else "and extraction.lock_timeout is 0"
        return (f"the activation cache at {self.root} is in use by another extraction ({holder}) {waited}: "
                "let it finish (a second run then reuses its cache), or raise extraction.lock_timeout "
                "(null waits as long as it takes)")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:  # closing the descriptor also drops the flock
            os.close(self._fd)
