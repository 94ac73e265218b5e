"""PostgreSQL, for more than one process: a pool of psycopg 3 connections.

Reads and writes share one pool; every write is one transaction on a pooled
connection at READ COMMITTED. Without SQLite's single writer, concurrent
transactions interleave, so a check-then-act takes the chain's row lock first
(``lock_chain``, ``SELECT … FOR NO KEY UPDATE``): two transactions on one chain
then run one after the other, and the event ids they take
(``chains.last_event_id``, bumped under that same lock) are in commit order.
Every writer takes the chain first, status changes included, so no two
transactions take the same locks in opposite orders. The queue's limits are checked under
an advisory lock (``lock_queue``), so two replicas cannot both take the last
place. Lock waits are bounded by ``lock_timeout``; past it the write is
``StorageUnavailable``, as a locked SQLite database is.

The statements are the store's portable SQL, translated once each to psycopg's
placeholders (``:name`` → ``%(name)s``, ``?`` → ``%s``). Migrations run in one
transaction under an advisory lock, so processes starting together on a fresh
database take turns, as on SQLite.

psycopg 3, not asyncpg: procrastinate, the job queue on PostgreSQL, is built on
psycopg 3, and a branch's job must be deferred in the very transaction that
creates its nodes (docs/deploy.md).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sparrow.errors import StorageUnavailable
from sparrow.store.db import BUSY_S, MIGRATION_WAIT_S, Params, Row, redact
from sparrow.store.migrations import POSTGRES_MIGRATIONS as MIGRATIONS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
POOL_SIZE = 10
# Advisory lock keys (any two distinct 64-bit numbers; these spell "sparrow" and a suffix).
MIGRATION_LOCK = 0x73706172726F7701
QUEUE_LOCK = 0x73706172726F7702

_TOKENS = re.compile(r"'(?:[^']|'')*'|::|:(\w+)|\?|%")


@lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """The portable statement with psycopg's placeholders."""

    def swap(match: re.Match[str]) -> str:
        token = match.group(0)
        if match.group(1) is not None:
            return f"%({match.group(1)})s"
        return {"?": "%s", "%": "%%"}.get(token, token)  # literals and casts stay

    return _TOKENS.sub(swap, sql)


def _reason(exc: BaseException) -> str:
    """The first line of a driver error, the password cut out if it ever shows."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rstrip(".")


def ids_in(param: str) -> str:
    return f"IN (SELECT json_array_elements_text(CAST(:{param} AS json)))"


# A walk of the tree (a recursive CTE) touches a few rows per level through an index;
# before its statistics know the nodes table, PostgreSQL's planner may hash-join the
# whole table at every level instead (111 ms at depth 1,000, quadratic in depth). The
# walks run with nested loops only, which is what they are.
_NESTED_LOOPS = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"


def walks_tree(sql: str) -> bool:
    return "WITH RECURSIVE" in sql


class PostgresTx:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self._nested_loops = False

    async def _execute(self, sql: str, params: Params) -> psycopg.AsyncCursor[Any]:
        if not self._nested_loops and walks_tree(sql):
            await self.conn.execute(_NESTED_LOOPS)
            self._nested_loops = True  # SET LOCAL: for the rest of the transaction
        return await self.conn.execute(placeholders(sql), params)

    async def rows(self, sql: str, params: Params = ()) -> list[Row]:
        cur = await self._execute(sql, params)
        return list(await cur.fetchall()) if cur.description else []

    async def run(self, sql: str, params: Params = ()) -> int:
        cur = await self._execute(sql, params)
        return cur.rowcount

    async def run_many(self, sql: str, params: Iterable[Params]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(placeholders(sql), params)

    async def lock_chain(self, chain_id: str) -> None:
        await self.conn.execute("SELECT 1 FROM chains WHERE id = %s FOR NO KEY UPDATE", (chain_id,))

    async def lock_chain_of(self, node_id: str) -> None:
        await self.conn.execute(
            "SELECT 1 FROM chains WHERE id = (SELECT chain_id FROM nodes WHERE id = %s) "
            "FOR NO KEY UPDATE",
            (node_id,),
        )

    async def lock_queue(self) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK,))


class PostgresDatabase:
    kind = "postgresql"
    schema_version = len(MIGRATIONS)

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.where = redact(url)
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None

    def ids_in(self, param: str) -> str:
        return ids_in(param)

    async def connect(
        self, *, autocommit: bool = True, name: str = "sparrow"
    ) -> psycopg.AsyncConnection[Any]:
        """A connection of its own (not the pool's), named ``name`` in ``pg_stat_activity``;
        an unreachable database or a refused login is ``StorageUnavailable`` with one
        sentence that names no password."""
        try:
            return await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=round(CONNECT_TIMEOUT_S),
                application_name=name,
            )
        except psycopg.Error as exc:
            raise StorageUnavailable(
                f"Cannot connect to PostgreSQL at {self.where}: {_reason(exc)}."
            ) from None

    async def open(self) -> None:
        conn = await self.connect(autocommit=False)
        try:
            await self._migrate(conn)
        finally:
            await conn.close()
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            kwargs={
                "connect_timeout": round(CONNECT_TIMEOUT_S),
                "options": f"-c lock_timeout={round(BUSY_S * 1000)}",
                "application_name": "sparrow",
            },
            # Autocommit set here, not in kwargs: procrastinate opens its listening
            # connection with the pool's kwargs and autocommit of its own.
            configure=_autocommit,
            check=AsyncConnectionPool.check_connection,
            name="sparrow",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout:
            await pool.close()
            raise StorageUnavailable(
                f"Cannot open connections to PostgreSQL at {self.where}."
            ) from None
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Run the migrations this database lacks, in one transaction under an advisory
        lock: of processes starting together, one migrates, the others then find nothing
        to do."""
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {round(MIGRATION_WAIT_S * 1000)}")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            cur = await conn.execute("SELECT version FROM schema_version")
            row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StorageUnavailable(
                    f"The database's schema (version {version}) is newer than this Sparrow "
                    f"knows ({len(MIGRATIONS)}); run the newer version."
                )
            for script in MIGRATIONS[version:]:
                await conn.execute(script if isinstance(script, str) else script())
            if row is None:
                await conn.execute(
                    "INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS),)
                )
            elif version < len(MIGRATIONS):
                await conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        """The open pool (procrastinate shares it)."""
        return self._opened()

    def _opened(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise StorageUnavailable("The database is not open.")
        return self._pool

    @asynccontextmanager
    async def transaction(
        self, on_commit: Callable[[], None] | None = None, *, wait_s: float = BUSY_S
    ) -> AsyncIterator[PostgresTx]:
        pool = self._opened()
        try:
            async with pool.connection(timeout=wait_s) as conn, conn.transaction():
                if wait_s != BUSY_S:
                    await conn.execute(f"SET LOCAL lock_timeout = {max(1, round(wait_s * 1000))}")
                yield PostgresTx(conn)
        except PoolTimeout:
            raise StorageUnavailable(
                f"The database is busy: this write waited {wait_s:g} s for a connection; "
                "try again later."
            ) from None
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc
        if on_commit is not None:
            on_commit()

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        pool = self._opened()
        try:
            async with pool.connection(timeout=BUSY_S) as conn:
                if walks_tree(sql):
                    async with conn.transaction():
                        return await PostgresTx(conn).rows(sql, params)
                cur = await conn.execute(placeholders(sql), params)
                return list(await cur.fetchall())
        except PoolTimeout:
            raise StorageUnavailable("The database is busy; try again later.") from None
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def probe_write(self, timeout_s: float = 1.0) -> str | None:
        if self._pool is None:
            return "The database is not open."
        ms = max(1, round(timeout_s * 1000))
        try:
            async with self._pool.connection(timeout=timeout_s) as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {ms}")
                await conn.execute(f"SET LOCAL statement_timeout = {ms}")
                await conn.execute(
                    "INSERT INTO probes (id, at) VALUES (1, CAST(now() AS TEXT)) "
                    "ON CONFLICT (id) DO UPDATE SET at = excluded.at"
                )
        except PoolTimeout:
            return f"No connection to PostgreSQL at {self.where} within {timeout_s:g} s."
        except psycopg.Error as exc:
            return f"The database does not take writes ({_reason(exc)})."
        return None

    async def ping(self) -> bool:
        try:
            await self.fetchone("SELECT 1")
        except StorageUnavailable:
            return False
        return True


async def _autocommit(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_autocommit(True)


def _unavailable(exc: psycopg.Error) -> StorageUnavailable:
    # A lost connection, a lock held too long, a full disk: the server's trouble.
    return StorageUnavailable(
        f"The database cannot be used right now ({_reason(exc)}); try again later."
    )
