"""The tests' PostgreSQL: a real server from Debian's binaries, started by the tests
themselves (``sparrow.store.local_postgres``), as the ``postgres`` user when they run
as root, on 127.0.0.1 and a free port."""

from __future__ import annotations

from sparrow.store.local_postgres import LocalPostgres as PostgresServer
from sparrow.store.local_postgres import local_postgres as running_postgres

REASON = "PostgreSQL's server binaries (Debian's postgresql package) are not installed"

__all__ = ["REASON", "PostgresServer", "running_postgres"]
