"""SQLite, the embedded default: one writer, one reader, WAL, versioned schema.

Writes go through ``transaction()``, which holds an asyncio lock around a
``BEGIN IMMEDIATE`` transaction on the writer connection, so writes are
serialized and never interleave. Reads use their own connections; with WAL they
see the last committed state and never wait for the writer. A read first runs
on the event loop's own thread (``_LoopReader``), which saves the two thread
hops of aiosqlite on the small reads most requests make; one that would keep
the loop longer than ``LOOP_READ_BUDGET_S`` (a long recursive spine, a lock) is
stopped and runs on aiosqlite's thread instead, as every read did before.

A full disk must not stop the server from recording what happened (a job
that failed because the disk is full still has to say so). Beside the
database file lies a reserve of ``RESERVE_BYTES``, allocated while there is
room; a write refused because the disk is full releases it, so the retried
write (see ``sparrow.jobs.persistently``) finds room. The reserve is made again
once the disk has room for it to spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from sparrow.errors import StorageUnavailable
from sparrow.store.db import BUSY_S, MIGRATION_WAIT_S, Params, Row
from sparrow.store.migrations import SQLITE_MIGRATIONS as MIGRATIONS

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 << 20
RESERVE_RETRY_S = 5.0
# How long a read may hold the event loop before it is handed to a thread.
LOOP_READ_BUDGET_S = 0.002
_PROGRESS_OPS = 500  # SQLite VM steps between two looks at the clock


class _LoopReader:
    """A read-only connection used on the event loop's thread, for reads that are quick.

    A progress handler interrupts a read once it has run ``LOOP_READ_BUDGET_S``, and the
    connection never waits for a lock (``busy_timeout = 0``): either way ``fetchall``
    answers None and the caller reads on a thread, where waiting costs the loop nothing.
    """

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)  # this thread only
        self.conn.execute("PRAGMA busy_timeout = 0")
        self.conn.execute("PRAGMA query_only = ON")
        self._deadline = 0.0
        self.conn.set_progress_handler(self._over_budget, _PROGRESS_OPS)

    def _over_budget(self) -> bool:
        return time.perf_counter() > self._deadline

    def fetchall(self, sql: str, params: Params) -> list[Row] | None:
        """The rows, or None: the read would hold the loop (too long, a lock, the
        database in trouble, another thread) and belongs on a thread."""
        self._deadline = time.perf_counter() + LOOP_READ_BUDGET_S
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error:
            return None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


async def _connect(path: Path, *, readonly: bool) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute(f"PRAGMA busy_timeout = {round(BUSY_S * 1000)}")
    await conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        await conn.execute("PRAGMA query_only = ON")
    return conn


class SqliteTx:
    """A transaction on the writer connection. SQLite has one writer: every transaction
    holds the whole database, so the explicit locks are already held."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    # One trip to aiosqlite's thread per statement: each trip costs the event loop a
    # wake-up, which is most of what a small request's read costs (docs/performance.md).

    async def rows(self, sql: str, params: Params = ()) -> list[Row]:
        return list(await self.conn.execute_fetchall(sql, params))

    async def run(self, sql: str, params: Params = ()) -> int:
        cursor = await self.conn.execute(sql, params)  # a statement without rows: done
        return cursor.rowcount

    async def run_many(self, sql: str, params: Iterable[Params]) -> None:
        await self.conn.executemany(sql, params)

    async def lock_chain(self, chain_id: str) -> None:
        pass

    async def lock_chain_of(self, node_id: str) -> None:
        pass

    async def lock_queue(self) -> None:
        pass


class SqliteDatabase:
    kind = "sqlite"
    schema_version = len(MIGRATIONS)

    def __init__(self, path: Path, *, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.path = path
        self.reserve = path.with_name(f"{path.name}.reserve")
        self.reserve_bytes = reserve_bytes
        self._reserve_due: float | None = 0.0  # when to try to allocate it; None: it is there
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._loop_reader: _LoopReader | None = None
        self._write_lock = asyncio.Lock()
        self._busy_ms = round(BUSY_S * 1000)  # the writer's busy_timeout, as last set

    def ids_in(self, param: str) -> str:
        return f"IN (SELECT value FROM json_each(:{param}))"

    async def open(self) -> None:
        """Open (and migrate) the database. On a disk too full for SQLite to make its WAL
        files, the reserve is released and the opening tried once more."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._open_taking_turns()
        except sqlite3.OperationalError:
            await self.close()
            if not self.reserve.exists():
                raise
            await asyncio.to_thread(self._release_reserve)
            await self._open()

    async def _open_taking_turns(self) -> None:
        """``_open``, tried again while another process holds the database in a way no
        busy timeout waits for (SQLite answers at once while a connection elsewhere
        changes the journal mode, or removes the WAL files as it closes): processes
        started together on a fresh database take turns."""
        deadline = time.monotonic() + MIGRATION_WAIT_S
        while True:
            try:
                await self._open()
                return
            except sqlite3.OperationalError as exc:
                busy = (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                log.info("the database is busy opening elsewhere; trying again: %s", exc)
                await self.close()
                await asyncio.sleep(0.05)

    async def _open(self) -> None:
        self._writer = await _connect(self.path, readonly=False)
        await self._writer.execute("PRAGMA journal_mode = WAL")
        # FULL: a transaction acknowledged to a client survives power loss too.
        await self._writer.execute("PRAGMA synchronous = FULL")
        await self._migrate()
        self._reader = await _connect(self.path, readonly=True)
        try:
            self._loop_reader = _LoopReader(self.path)
        except sqlite3.Error as exc:  # reads still work, on the thread
            log.warning("SQLite reads on the event loop are off: %s", exc)
        await asyncio.to_thread(self._keep_reserve)

    async def close(self) -> None:
        if self._loop_reader is not None:
            self._loop_reader.close()
            self._loop_reader = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def _migrate(self) -> None:
        """Run the migrations this database lacks, all in one transaction.

        The version is read inside that ``BEGIN IMMEDIATE`` transaction, so processes
        starting together on a fresh database migrate one after another: the first
        migrates, the others wait for its lock and then find nothing to do. Foreign keys
        are off meanwhile (SQLite ignores the pragma inside a transaction), so that a
        migration can rebuild a table, and are checked before the commit.
        """
        writer = self._writer
        assert writer is not None
        async with writer.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        if row is not None and int(row[0]) == len(MIGRATIONS):
            return  # the usual start: nothing to do, no write lock taken
        await writer.execute(f"PRAGMA busy_timeout = {round(MIGRATION_WAIT_S * 1000)}")
        await writer.execute("PRAGMA foreign_keys = OFF")
        try:
            await writer.execute("BEGIN IMMEDIATE")
            try:
                async with writer.execute("PRAGMA user_version") as cur:
                    row = await cur.fetchone()
                version = int(row[0]) if row else 0
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in _statements(script):
                        await writer.execute(statement)
                    await writer.execute(f"PRAGMA user_version = {number}")
                async with writer.execute("PRAGMA foreign_key_check") as cur:
                    broken = list(await cur.fetchall())
                if broken:
                    raise RuntimeError(f"the migrations break foreign keys: {broken[:5]}")
                await writer.execute("COMMIT")
            except BaseException:
                if writer.in_transaction:
                    await writer.execute("ROLLBACK")
                raise
        finally:
            await writer.execute("PRAGMA foreign_keys = ON")
            await writer.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    @asynccontextmanager
    async def transaction(
        self, on_commit: Callable[[], None] | None = None, *, wait_s: float = BUSY_S
    ) -> AsyncIterator[SqliteTx]:
        """Run the enclosed writes as one serialized, atomic transaction.

        Whatever fails (a statement, the caller's code, the COMMIT itself), the
        transaction is rolled back, so the writer is always clean for the next one.
        ``on_commit`` runs after a successful COMMIT while the write lock is still
        held, so whatever it announces is announced in commit order.

        ``wait_s`` bounds the wait for the transaction to begin, its turn among this
        process's writes and SQLite's lock (another process may hold it) together:
        past it, ``StorageUnavailable``. So a locked database makes each write wait at
        most that long, however many are queued; 0 is for writes that may be skipped.
        """
        if self._writer is None:
            raise StorageUnavailable("The database is not open.")
        writer = self._writer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        try:
            async with asyncio.timeout(wait_s):
                await self._write_lock.acquire()
        except TimeoutError:
            raise StorageUnavailable(
                f"The database is busy: this write waited {wait_s:g} s for its turn; "
                "try again later."
            ) from None
        try:
            remaining = deadline - loop.time()
            # Whole, unless the turn took a while: the pragma is not re-sent on every write.
            busy_ms = round(wait_s * 1000 if remaining > wait_s - 0.05 else remaining * 1000)
            busy_ms = max(0, busy_ms)
            if busy_ms != self._busy_ms:
                await writer.execute(f"PRAGMA busy_timeout = {busy_ms}")
                self._busy_ms = busy_ms
            try:
                await writer.execute("BEGIN IMMEDIATE")
                yield SqliteTx(writer)
                await writer.execute("COMMIT")
                if on_commit is not None:
                    on_commit()
            except BaseException as exc:
                if writer.in_transaction:
                    await writer.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                        await asyncio.to_thread(self._release_reserve)
                    raise _unavailable(exc) from exc
                raise
        finally:
            self._write_lock.release()
        if self._reserve_wanted():
            await asyncio.to_thread(self._keep_reserve)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        if self._reader is None:
            raise StorageUnavailable("The database is not open.")
        if self._loop_reader is not None:
            rows = self._loop_reader.fetchall(sql, params)
            if rows is not None:
                return rows
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def _reserve_wanted(self) -> bool:
        """Whether to try to allocate the reserve now: it is missing, and the last try (a
        disk without room for it) was ``RESERVE_RETRY_S`` ago, so that writes on a low
        disk do not each ask."""
        return self._reserve_due is not None and time.monotonic() >= self._reserve_due

    def _keep_reserve(self) -> None:
        """Allocate the reserve if it is missing and the disk has room to spare for it."""
        if self.reserve_bytes <= 0 or self.reserve.exists():
            self._reserve_due = None
            return
        self._reserve_due = time.monotonic() + RESERVE_RETRY_S
        try:
            if shutil.disk_usage(self.path.parent).free < 3 * self.reserve_bytes:
                return
            with self.reserve.open("wb") as f:
                os.posix_fallocate(f.fileno(), 0, self.reserve_bytes)
        except OSError as exc:
            log.warning("cannot allocate the database's reserve: %s", exc)
            with contextlib.suppress(OSError):
                self.reserve.unlink(missing_ok=True)
            return
        self._reserve_due = None

    def _release_reserve(self) -> None:
        if self.reserve.exists():
            log.warning("the disk is full: releasing the database's reserve to go on writing")
        with contextlib.suppress(OSError):
            self.reserve.unlink(missing_ok=True)
        self._reserve_due = time.monotonic() + RESERVE_RETRY_S

    async def probe_write(self, timeout_s: float = 1.0) -> str | None:
        """Whether the database takes a write now: None, or why not.

        On a connection of its own with a short busy timeout, so that a database locked by
        another process answers within ``timeout_s`` instead of the writer's 10 s, and the
        writer's transactions are left alone.
        """

        if self._writer is None:
            return "The database is not open."

        def write() -> None:
            conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO probes (id, at) VALUES (1, datetime('now')) "
                    "ON CONFLICT (id) DO UPDATE SET at = excluded.at"
                )
                conn.execute("COMMIT")
            finally:
                conn.close()

        try:
            await asyncio.to_thread(write)
        except sqlite3.Error as exc:
            return f"The database does not take writes ({exc})."
        if self._reserve_wanted():
            await asyncio.to_thread(self._keep_reserve)
        return None

    async def ping(self) -> bool:
        try:
            await self.fetchone("SELECT 1")
        except (StorageUnavailable, sqlite3.Error, ValueError):
            return False
        return True


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one (``executescript`` would commit first)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"a migration ends in an incomplete statement: {pending.strip()[:80]}")
    return statements


def _unavailable(exc: sqlite3.OperationalError) -> StorageUnavailable:
    # Disk full, I/O error, a lock held too long: the server's trouble, not the client's.
    return StorageUnavailable(f"The database cannot be used right now ({exc}); try again later.")
