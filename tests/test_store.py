"""The database layer on SQLite and PostgreSQL: migrations, transactions that always end
clean, event ids in commit order."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import psycopg
import pytest
from helpers import chain_with_root
from pg import PostgresServer

from sparrow.events import EventHub, NodeProgress, StoredEvent
from sparrow.models import Node, NodeKind, NodeStatus, new_id, utc_now
from sparrow.store import ChainStore, chains
from sparrow.store.db import Params, Row
from sparrow.store.migrations import POSTGRES_MIGRATIONS
from sparrow.store.migrations import SQLITE_MIGRATIONS as MIGRATIONS
from sparrow.store.postgres import PostgresDatabase
from sparrow.store.sqlite import SqliteDatabase as Database

pytestmark = pytest.mark.anyio


async def test_migrations_run_once_and_record_the_version(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for _ in range(2):  # opening again runs nothing new
        db = Database(path)
        await db.open()
        await db.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_failed_commit_leaves_the_writer_usable(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    await db.open()
    store = ChainStore(db, EventHub())
    now = utc_now()
    orphan = Node(
        id=new_id(),
        chain_id="no-such-chain",
        parent_id=None,
        kind=NodeKind.UPLOAD,
        status=NodeStatus.READY,
        committed=True,
        created_at=now,
        updated_at=now,
    )

    async def insert_failing_at_commit() -> None:
        async with store.write() as w:
            # Deferred: the foreign key fails at COMMIT, not at the INSERT.
            await w.tx.run("PRAGMA defer_foreign_keys = ON")
            await w.insert_nodes([orphan])

    with pytest.raises(sqlite3.IntegrityError):
        await insert_failing_at_commit()
    async with store.write() as w:  # the next transaction starts cleanly
        assert await w.get_node(orphan.id) is None
    assert await store.get_node(orphan.id) is None
    await db.close()


async def test_quick_reads_stay_on_the_loop_and_long_ones_go_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(tmp_path / "s.db")
    await db.open()
    assert db._reader is not None
    threaded: list[str] = []
    on_thread = db._reader.execute_fetchall

    async def counted(sql: str, params: object = ()) -> object:
        threaded.append(sql)
        return await on_thread(sql, params)

    monkeypatch.setattr(db._reader, "execute_fetchall", counted)
    assert await db.fetchall("SELECT 1 + ?", (1,)) == [(2,)]
    assert threaded == []
    # Far more work than the loop's budget: interrupted there, answered in full here.
    long = (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000000) "
        "SELECT count(*), sum(x) FROM n"
    )
    assert await db.fetchall(long) == [(2_000_000, 2_000_000 * 2_000_001 // 2)]
    assert threaded == [long]
    # A read while a write transaction holds the database: WAL readers never wait.
    async with db.transaction() as tx:
        await tx.run("CREATE TABLE scratch (x)")
        assert await db.fetchall("SELECT count(*) FROM sqlite_master WHERE name = 'scratch'") == [
            (0,)
        ]
    assert len(threaded) == 1
    await db.close()


def test_processes_migrating_a_fresh_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Six real ``sparrow db migrate`` processes started together on one fresh database
    (each read version 0 and ran migration 1 before: "table chains already exists")."""
    env = {**os.environ, "SPARROW_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "sparrow", "db", "migrate"]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    outcomes = [(proc.wait(60), proc.communicate()) for proc in procs]
    for code, (out, err) in outcomes:
        assert code == 0, err.decode()
        assert out.decode().strip() == f"The database is at schema version {len(MIGRATIONS)}."
    with sqlite3.connect(tmp_path / "data" / "sparrow.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


# PostgreSQL: the same guarantees without SQLite's single writer.


async def test_postgres_migrations_run_once_and_record_the_version(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    for _ in range(2):  # opening again runs nothing new
        db = PostgresDatabase(url)
        await db.open()
        await db.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (len(POSTGRES_MIGRATIONS),)
        ]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
        assert {"chains", "nodes", "events", "jobs", "stems", "api_keys", "probes"} <= tables


async def test_postgres_a_failed_transaction_leaves_the_pool_usable(
    postgres: PostgresServer,
) -> None:
    db = PostgresDatabase(postgres.new_database(), pool_size=1)  # one connection: the same one
    await db.open()
    store = ChainStore(db, EventHub())
    chain, root = chain_with_root()
    async with store.write() as w:
        await w.create_chain(chain, root)

    async def rename_then_fail() -> None:
        async with store.write() as w:
            await w.rename_chain(chain.id, "renamed")
            await w.insert_nodes([root])  # its id exists: the whole transaction rolls back

    for _ in range(3):
        with pytest.raises(psycopg.errors.UniqueViolation):
            await rename_then_fail()
    assert (await store.get_chain(chain.id)) == chain
    await db.close()


class RecordingHub(EventHub):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[int] = []

    def publish(self, events: Iterable[StoredEvent]) -> None:
        events = list(events)
        self.ids.extend(e.id for e in events)
        super().publish(events)


async def test_postgres_event_ids_follow_commit_order_under_concurrent_writers(
    postgres: PostgresServer,
) -> None:
    """Twenty writers in two processes' worth of pools emit on one chain at once: the ids
    are gapless, and each process's subscribers see them in increasing order."""
    url = postgres.new_database()
    hubs = [RecordingHub(), RecordingHub()]
    dbs = [PostgresDatabase(url, pool_size=5) for _ in hubs]
    for db in dbs:
        await db.open()
    stores = [ChainStore(db, hub) for db, hub in zip(dbs, hubs, strict=True)]
    chain, root = chain_with_root()
    async with stores[0].write() as w:
        await w.create_chain(chain, root)

    async def writer(store: ChainStore, n: int) -> None:
        for i in range(10):
            async with store.write() as w:
                node = await w.get_node(root.id)
                assert node is not None
                await w.emit(NodeProgress(chain.id, root.id, i / 10, None))

    await asyncio.gather(*(writer(stores[n % 2], n) for n in range(20)))
    for hub in hubs:
        assert hub.ids == sorted(hub.ids)
    assert sorted(hubs[0].ids + hubs[1].ids) == list(range(1, 201))
    for db in dbs:
        await db.close()


def test_processes_migrating_a_fresh_postgres_database_at_once_all_succeed(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    env = {**os.environ, "SPARROW_DATABASE_URL": url}
    command = [sys.executable, "-m", "sparrow", "db", "migrate"]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == (
            f"The database is at schema version {len(POSTGRES_MIGRATIONS)}."
        )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://sparrow:hunter2@127.0.0.1:1/sparrow", "Cannot connect to PostgreSQL"),
        ("mysql://root@localhost/sparrow", "must be a postgresql:// URL"),
    ],
)
def test_a_wrong_database_url_is_one_sentence_without_the_password(
    tmp_path: Path, url: str, says: str
) -> None:
    env = {**os.environ, "SPARROW_DATABASE_URL": url, "SPARROW_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "sparrow", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert says in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


async def test_postgres_walks_the_tree_by_index_before_it_has_statistics(
    postgres: PostgresServer,
) -> None:
    """On a fresh database (no ANALYZE yet) every recursive statement of the store runs as
    index lookups per level, never a join that scans the nodes table at every level
    (quadratic in depth: 111 ms at depth 1,000 before)."""
    db = PostgresDatabase(postgres.new_database())
    await db.open()
    store = ChainStore(db, EventHub())
    chain, root = chain_with_root()
    async with store.write() as w:
        await w.create_chain(chain, root)
    parent, nodes = root.id, []
    for _ in range(300):
        node = Node(
            id=new_id(),
            chain_id=chain.id,
            parent_id=parent,
            kind=NodeKind.CONTINUATION,
            status=NodeStatus.READY,
            committed=True,
            created_at=root.created_at,
            updated_at=root.created_at,
        )
        nodes.append(node)
        parent = node.id
    async with store.write() as w:
        await w.insert_nodes(nodes)
    statements = {
        "spine": (chains._SPINE_NODES, {"chain_id": chain.id}),
        "path": (
            f"WITH RECURSIVE {chains._ANCESTORS} SELECT id FROM ancestors",
            {"node_id": parent},
        ),
        "subtree": (
            f"WITH RECURSIVE {chains._SUBTREE} SELECT id FROM subtree",
            {"node_id": root.id},
        ),
    }
    for name, (sql, params) in statements.items():
        async with db.transaction() as tx:
            (plan,) = await tx.rows(f"EXPLAIN (FORMAT JSON) {sql}", params)
        text = json.dumps(plan)
        assert "Hash Join" not in text and "Merge Join" not in text, (name, text)
    assert [n.id for n in await store.spine(chain.id)] == [root.id] + [n.id for n in nodes]
    assert len(await store.path_to(parent)) == 301
    await db.close()


async def test_the_queue_hands_out_the_job_of_the_owner_with_the_fewest_running(
    tmp_path: Path,
) -> None:
    """Jobs that run side by side (SPARROW_MAX_BATCH) are spread across owners: with one of
    a's jobs running, b's job is claimed before a's older one; then a's, oldest first."""
    from sparrow.models import Job, JobKind

    db = Database(tmp_path / "s.db")
    await db.open()
    store = ChainStore(db, EventHub())
    chain, root = chain_with_root()
    jobs = [
        Job(f"j{i}", chain.id, JobKind.GENERATE, {}, f"2026-01-01T00:00:0{i}Z", owner=owner)
        for i, owner in enumerate(["a", "a", "a", "b", None])
    ]
    async with store.write() as w:
        await w.create_chain(chain, root)
        for job in jobs:
            await w.insert_job(job)
    claimed = []
    for _ in jobs:
        async with store.write() as w:
            next_job = await w.claim_next_job()
        assert next_job is not None
        claimed.append(next_job.id)
    await db.close()
    # j0 (a), then b's and the keyless job's before a's second and third.
    assert claimed == ["j0", "j3", "j4", "j1", "j2"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_list_page_and_its_total_for_everyone_and_for_one_owner(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Newest first, ties the later made first, paged; the total taken from the last page,
    counted for the others. On SQLite each list reads its index in its own order, with no
    sort, and one owner's list reads only that owner's chains."""
    if kind == "sqlite":
        db: Database | PostgresDatabase = Database(tmp_path / "sparrow.db")
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        db = PostgresDatabase(server.new_database())
    await db.open()
    store = ChainStore(db, EventHub())
    made = []
    for i in range(12):
        chain, root = chain_with_root()
        at = f"2026-12-02T00:00:0{i // 3}.000Z"  # three chains made at each instant
        chain = dataclasses.replace(chain, owner="ab"[i % 2], created_at=at)
        async with store.write() as w:
            await w.create_chain(chain, root)
        made.append(chain)
    statements: list[tuple[str, Params]] = []
    fetchall = db.fetchall

    async def recording(sql: str, params: Params = ()) -> list[Row]:
        statements.append((sql, params))
        return await fetchall(sql, params)

    db.fetchall = recording  # type: ignore[method-assign]
    for owner in (None, "a"):
        newest = [c.id for c in reversed(made) if owner is None or c.owner == owner]
        for limit, offset in ((5, 0), (5, 5), (50, 0), (len(newest), 0), (3, 20)):
            page, total = await store.list_chains(owner=owner, limit=limit, offset=offset)
            assert [c.id for c in page] == newest[offset : offset + limit], (owner, limit, offset)
            assert total == len(newest), (owner, limit, offset)
    if kind == "sqlite":
        lists = {sql: params for sql, params in statements if "LIMIT" in sql}
        assert len(lists) == 2  # everyone's, and one owner's
        for sql, params in lists.items():
            plan = " ".join(str(r) for r in await fetchall(f"EXPLAIN QUERY PLAN {sql}", params))
            index = "chains_owner (owner=?)" if "WHERE owner" in sql else "chains_created"
            assert index in plan and "TEMP B-TREE" not in plan, plan
    await db.close()


async def test_a_node_read_for_an_owner_looks_up_its_own_chain_only(tmp_path: Path) -> None:
    """The owner's check costs one primary-key lookup of the node's chain, however many
    chains the owner has (listing them all was 1.7 ms a read at 4,000 chains)."""
    db = Database(tmp_path / "sparrow.db")
    await db.open()
    store = ChainStore(db, EventHub())
    chain, root = chain_with_root()
    async with store.write() as w:
        await w.create_chain(dataclasses.replace(chain, owner="a"), root)
    assert (await store.get_node(root.id, owner="a")) == root
    assert await store.get_node(root.id, owner="b") is None
    assert (await store.get_node(root.id)) == root
    params = {"id": root.id, "owner": "a"}
    plan = " ".join(
        str(r) for r in await db.fetchall(f"EXPLAIN QUERY PLAN {chains._SELECT_NODE}", params)
    )
    assert "SEARCH chains USING INDEX sqlite_autoindex_chains_1 (id=?)" in plan, plan
    assert "LIST SUBQUERY" not in plan and "chains_owner" not in plan, plan
    await db.close()
