"""The database under the store: SQLite (the embedded default) or PostgreSQL.

The repositories (``chains``, ``events``, ``jobs``, ``stems``, ``keys``) hold
every SQL statement, written once for both: named parameters (``:name``) or
positional ones (``?``), and standard SQL both engines run the same way
(recursive CTEs, ``RETURNING``, ``ON CONFLICT``, partial unique indexes). A
PostgreSQL table carries an identity column named ``rowid`` standing in for
SQLite's implicit one, so "in insertion order" reads the same on both. What
differs is behind the two small protocols here:

- ``Database``: open (and migrate), reads, one write transaction at a time per
  caller, readiness probes.
- ``Tx``: the statements of one transaction, plus the locks that SQLite's single
  writer makes unnecessary and PostgreSQL needs: ``lock_chain`` before a
  check-then-act on a chain, ``lock_queue`` before counting the queue for its
  limits.

``open_database(settings)`` picks the implementation from
``SPARROW_DATABASE_URL``; nothing above the store knows which one it has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from sparrow.errors import StorageUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from sparrow.settings import Settings

Row = Sequence[Any]  # positional: columns in the order the statement names them
Params = Sequence[Any] | Mapping[str, Any]

BUSY_S = 10.0  # the longest a write waits for the database: its turn, and the locks
MIGRATION_WAIT_S = 120.0  # another process's migrations may rebuild a large table


class Tx(Protocol):
    """The statements of one open write transaction."""

    async def rows(self, sql: str, params: Params = ()) -> list[Row]:
        """Run a statement; its rows (those of ``RETURNING`` too)."""
        ...

    async def run(self, sql: str, params: Params = ()) -> int:
        """Run a statement; how many rows it changed."""
        ...

    async def run_many(self, sql: str, params: Iterable[Params]) -> None: ...

    async def lock_chain(self, chain_id: str) -> None:
        """Hold the chain's row until the end of the transaction: what this transaction
        reads of the chain and then changes, no other changes in between."""
        ...

    async def lock_chain_of(self, node_id: str) -> None:
        """``lock_chain`` for the node's chain (nothing if there is no such node)."""
        ...

    async def lock_queue(self) -> None:
        """Hold the queue until the end of the transaction: a count of waiting jobs and the
        insert it allows are not split by another process's."""
        ...


class Database(Protocol):
    kind: str  # "sqlite" or "postgresql"
    schema_version: int  # the migrations this Sparrow knows, all run once open

    def ids_in(self, param: str) -> str:
        """SQL for "``IN`` the ids of the JSON array in parameter ``param``"."""
        ...

    async def open(self) -> None:
        """Connect, and bring the schema up to date (processes starting at once take turns)."""
        ...

    async def close(self) -> None: ...

    def transaction(
        self, on_commit: Callable[[], None] | None = None, *, wait_s: float = BUSY_S
    ) -> AbstractAsyncContextManager[Tx]:
        """One atomic write transaction; any exception rolls it back. ``on_commit`` runs once
        it has committed. ``wait_s`` bounds the wait for it to begin (and, on PostgreSQL,
        for each lock): past it, ``StorageUnavailable``."""
        ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...

    async def probe_write(self, timeout_s: float = 1.0) -> str | None:
        """Whether the database takes a write now: None, or why not (one sentence)."""
        ...

    async def ping(self) -> bool: ...


def open_database(settings: Settings) -> Database:
    """The database the settings name (not opened yet)."""
    if settings.database_url is not None:
        try:
            from sparrow.store.postgres import PostgresDatabase
        except ModuleNotFoundError as exc:
            raise StorageUnavailable(
                f"PostgreSQL needs the cluster extra ({exc.name} is missing): "
                "pip install -e '.[cluster]'."
            ) from None
        return PostgresDatabase(settings.database_url.get_secret_value())
    from sparrow.store.sqlite import SqliteDatabase

    return SqliteDatabase(settings.db_path)


def describe(settings: Settings) -> str:
    """The database the settings name, for messages: never with a password."""
    if settings.database_url is None:
        return str(settings.db_path)
    return redact(settings.database_url.get_secret_value())


def redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))
