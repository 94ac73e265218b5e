"""A PostgreSQL server of its own, for the tests, the benchmarks and trying the cluster
on one machine: Debian's server binaries (``apt-get install postgresql``), a data dir in
a temporary folder, 127.0.0.1 only, a free port.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres``
user and every command runs as that user; otherwise as whoever runs it. ``fsync`` is
off (a scratch database need not survive a power cut); ``new_database`` makes a fresh,
empty database for each test or benchmark that asks.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg


def binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalPostgres:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="sparrow-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "sparrow"
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._owner = pwd.getpwnam("postgres")
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        self._count = 0

    def _as_owner(self, *command: str) -> None:
        owner = self._owner
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
            cwd=self.root,
            timeout=60,
        )

    def start(self) -> None:
        self._as_owner(
            str(self.bindir / "initdb"),
            "-D", str(self.data),
            "-U", self.user,
            "-A", "trust",
            "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off "
            f"-c unix_socket_directories={self.root} -c max_connections=300"
        )
        self._as_owner(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.data),
            "-o", options,
            "-l", str(self.root / "server.log"),
            "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def local_postgres() -> Iterator[LocalPostgres | None]:
    """A started server, or None where the binaries are missing."""
    bindir = binaries()
    if bindir is None:
        yield None
        return
    server = LocalPostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
