"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` on a temporary folder, loopback only.

Uses the Debian ``postgresql`` package's binaries (``/usr/lib/postgresql/<version>/bin``). As root the
server runs as the ``postgres`` user (``initdb`` refuses root), on a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A running server; ``url(database)`` creates the database and returns its SQLAlchemy URL."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = binary("initdb"), binary("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            message = "PostgreSQL is not installed (apt-get install -y postgresql)"
            if os.environ.get("SAHS_REQUIRE_POSTGRES"):
                pytest.fail(message)
            pytest.skip(message)
        self.folder = Path(tempfile.mkdtemp(prefix="sahs-pg-"))
        self.as_user = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        data = self.folder / "data"
        self._run([initdb, "-D", str(data), "-U", "sahs", "-A", "trust", "--no-sync", "-E", "UTF8"])
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run([self.pg_ctl, "-D", str(data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"])
        self.data = data
        self.databases = 0

    def _run(self, command: list[str]) -> None:
        subprocess.run([*self.as_user, *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.folder)

    def url(self) -> str:
        import psycopg

        self.databases += 1
        name = f"sweep{self.databases}"
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = psycopg.connect(host="127.0.0.1", port=self.port, user="sahs", dbname="postgres",
                                             autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        return f"postgresql://sahs@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = Server()
    try:
        yield server
    finally:
        server.stop()
