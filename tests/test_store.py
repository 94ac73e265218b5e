"""The database layer: migrations, transactions that always end clean."""

from __future__ import annotations

import sqlite3
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
