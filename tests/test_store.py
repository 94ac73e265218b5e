"""The database layer: migrations, transactions that always end clean."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sparrow.events import EventHub
from sparrow.models import Node, NodeKind, NodeStatus, new_id, utc_now
from sparrow.store import ChainStore, Database
from sparrow.store.migrations import MIGRATIONS

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
            await w.tx.execute("PRAGMA defer_foreign_keys = ON")
            await w.insert_nodes([orphan])

    with pytest.raises(sqlite3.IntegrityError):
        await insert_failing_at_commit()
    async with store.write() as w:  # the next transaction starts cleanly
        assert await w.get_node(orphan.id) is None
    assert await store.get_node(orphan.id) is None
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
