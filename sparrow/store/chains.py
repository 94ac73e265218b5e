"""The repository of chains and nodes: every SQL statement about them.

Reads go through ``ChainStore`` on the reader connection. Writes go through a
``ChainWriter`` from ``ChainStore.write()``: one serialized transaction in which
the caller can read the rows it is about to change, check its rules and act,
with no other write in between (a commit cannot race a discard).

The spine and the commit rules are written as recursive CTEs over the
``parent_id`` tree, so each operation is one round of statements whatever the
depth of the chain.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from sparrow.events import EventHub, StoredEvent
from sparrow.models import Chain, Node, Stems, utc_now
from sparrow.store.analysis import AnalysisWrites, next_unanalysed
from sparrow.store.db import BUSY_S, Database, Tx
from sparrow.store.events import EventWrites
from sparrow.store.jobs import JobWrites
from sparrow.store.rows import (
    CHAIN_COLUMNS,
    NODE_COLUMNS,
    chain_from_row,
    node_from_row,
    node_values,
)
from sparrow.store.stems import SELECT_STEMS, STEMS_COLUMNS, StemsWrites, stems_from_row

# The path from a node up to the root, the node included, with each node's
# distance from it (``up`` is the parent: a name no node column shares). Each step
# is one primary-key lookup, written as a scalar subquery so that no planner can
# choose to scan the table once per level (PostgreSQL does, before its statistics
# know the table).
_ANCESTORS = """
    ancestors(id, up, depth) AS (
        SELECT id, parent_id, 0 FROM nodes WHERE id = :node_id
        UNION ALL
        SELECT a.up, (SELECT n.parent_id FROM nodes AS n WHERE n.id = a.up), a.depth + 1
        FROM ancestors AS a WHERE a.up IS NOT NULL
    )
"""

# A node and everything below it.
_SUBTREE = """
    subtree(id, depth) AS (
        SELECT id, 0 FROM nodes WHERE id = :node_id
        UNION ALL
        SELECT n.id, s.depth + 1 FROM nodes AS n JOIN subtree AS s ON n.parent_id = s.id
    )
"""

# The committed path from the chain's root down. Each step looks up the one committed
# child (the partial unique index guarantees at most one) as a scalar subquery, for
# the reason above; the walk ends with one row whose id is NULL, which every reader
# leaves out.
_SPINE = """
    spine(id, depth) AS (
        SELECT root_node_id, 0 FROM chains WHERE id = :chain_id
        UNION ALL
        SELECT (
            SELECT n.id FROM nodes AS n WHERE n.parent_id = s.id AND n.committed = 1
        ), s.depth + 1
        FROM spine AS s WHERE s.id IS NOT NULL
    )
"""


def _with(*ctes: str) -> str:
    return "WITH RECURSIVE " + ",".join(ctes)


# ``:owner`` NULL reads any chain's rows (auth off, or the server's own work);
# otherwise only that owner's: another owner's id reads as if it did not exist.
_OWNED = "(CAST(:owner AS TEXT) IS NULL OR owner = :owner)"
_SPINE_NODES = (
    f"{_with(_SPINE)} SELECT {NODE_COLUMNS} FROM spine JOIN nodes USING (id) ORDER BY spine.depth"
)
_SPINE_IDS = f"{_with(_SPINE)} SELECT id FROM spine WHERE id IS NOT NULL ORDER BY depth"
# The owner's check looks up the node's own chain (EXISTS, by primary key): ``chain_id
# IN (SELECT … WHERE owner = :owner)`` would list all of the owner's chains for each read.
_SELECT_NODE = (
    f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = :id "
    "AND (CAST(:owner AS TEXT) IS NULL OR EXISTS "
    "(SELECT 1 FROM chains WHERE chains.id = nodes.chain_id AND owner = :owner))"
)
_SELECT_CHAIN = f"SELECT {CHAIN_COLUMNS} FROM chains WHERE id = :id AND {_OWNED}"

_INSERT_NODE = (
    f"INSERT INTO nodes ({NODE_COLUMNS}) VALUES ("
    + ", ".join(f":{c.strip()}" for c in NODE_COLUMNS.split(","))
    + ")"
)


class Announce(Protocol):
    async def __call__(self, tx: Tx, chain_ids: set[str]) -> None:
        """Say, inside the transaction, that these chains have new events (see ``write``)."""
        ...


class ChainStore:
    def __init__(
        self,
        db: Database,
        hub: EventHub,
        *,
        event_retention: int = 1000,
        event_retention_bytes: int = 8 << 20,
        announce: Announce | None = None,
    ) -> None:
        self.db = db
        self.hub = hub
        self.event_retention = event_retention
        self.event_retention_bytes = event_retention_bytes
        self.announce = announce

    @asynccontextmanager
    async def write(self, *, wait_s: float = BUSY_S) -> AsyncIterator[ChainWriter]:
        """One atomic write transaction; an exception rolls it back.

        The events the writer emits reach subscribers once the transaction has committed,
        in id order; a rolled-back transaction delivers nothing. By default they are
        handed to this process's hub on commit (SQLite's single writer commits in id
        order). With ``announce`` (PostgreSQL, several processes), the transaction
        announces its chains instead and every process reads the events from the log
        (``sparrow.cluster.LogFeed``). ``wait_s``: as in ``Database.transaction``.
        """
        emitted: list[StoredEvent] = []
        announce = self.announce
        on_commit = None if announce is not None else lambda: self.hub.publish(emitted)
        async with self.db.transaction(on_commit=on_commit, wait_s=wait_s) as tx:
            yield ChainWriter(
                tx, self.db, emitted, self.event_retention, self.event_retention_bytes
            )
            if announce is not None and emitted:
                await announce(tx, {e.chain_id for e in emitted})

    async def get_chain(self, chain_id: str, *, owner: str | None = None) -> Chain | None:
        """The chain, if it exists and ``owner`` (when given) owns it."""
        row = await self.db.fetchone(_SELECT_CHAIN, {"id": chain_id, "owner": owner})
        return chain_from_row(row) if row else None

    async def list_chains(
        self, *, owner: str | None, limit: int, offset: int
    ) -> tuple[list[Chain], int]:
        """A page of the chains, newest first, and how many there are in all. A page that
        is not full and not past the end is the last one: the total is what comes before
        it and what is on it, with no count to make (most lists are one such page)."""
        params = {"owner": owner, "limit": limit, "offset": offset}
        # Spelled out for each case, not as _OWNED's OR: the planner then reads one
        # owner's chains from chains_owner instead of scanning everyone's.
        where = "" if owner is None else "WHERE owner = :owner"
        rows = await self.db.fetchall(
            f"SELECT {CHAIN_COLUMNS} FROM chains {where} "
            "ORDER BY created_at DESC, rowid DESC LIMIT :limit OFFSET :offset",
            params,
        )
        chains = [chain_from_row(r) for r in rows]
        if len(rows) < limit and (rows or offset == 0):
            return chains, offset + len(rows)
        total = await self.db.fetchone(f"SELECT count(*) FROM chains {where}", params)
        return chains, int(total[0]) if total else 0

    async def get_node(self, node_id: str, *, owner: str | None = None) -> Node | None:
        """The node, if it exists and ``owner`` (when given) owns its chain."""
        row = await self.db.fetchone(_SELECT_NODE, {"id": node_id, "owner": owner})
        return node_from_row(row) if row else None

    async def list_nodes(self, chain_id: str) -> list[Node]:
        rows = await self.db.fetchall(
            f"SELECT {NODE_COLUMNS} FROM nodes WHERE chain_id = ? ORDER BY created_at, rowid",
            (chain_id,),
        )
        return [node_from_row(r) for r in rows]

    async def spine(self, chain_id: str) -> list[Node]:
        """The committed path of a chain, root first."""
        rows = await self.db.fetchall(_SPINE_NODES, {"chain_id": chain_id})
        return [node_from_row(r) for r in rows]

    async def path_to(self, node_id: str) -> list[Node]:
        """The nodes from the root down to the node, the node included."""
        rows = await self.db.fetchall(
            f"{_with(_ANCESTORS)} SELECT {NODE_COLUMNS} "
            "FROM ancestors JOIN nodes USING (id) ORDER BY ancestors.depth DESC",
            {"node_id": node_id},
        )
        return [node_from_row(r) for r in rows]

    async def next_unanalysed(self, stale_before: str) -> str | None:
        """The oldest ready node waiting for its analysis (``sparrow.store.analysis``)."""
        return await next_unanalysed(self.db, stale_before)

    async def spine_ids(self, chain_id: str) -> list[str]:
        rows = await self.db.fetchall(
            f"{_with(_SPINE)} SELECT id FROM spine WHERE id IS NOT NULL ORDER BY depth",
            {"chain_id": chain_id},
        )
        return [r[0] for r in rows]

    async def ids_with_audio(self) -> set[str]:
        """The nodes that own a file: the ready ones. A file of any other node was
        left by a crash between writing it and marking the node ready."""
        return {r[0] for r in await self.db.fetchall("SELECT id FROM nodes WHERE status = 'ready'")}

    async def get_stems(self, node_id: str) -> Stems | None:
        row = await self.db.fetchone(SELECT_STEMS, (node_id,))
        return stems_from_row(row) if row else None

    async def stems_of(self, node_ids: Sequence[str]) -> dict[str, Stems]:
        """The stems rows of these nodes, by node id (nodes without one are absent)."""
        rows = await self.db.fetchall(
            f"SELECT {STEMS_COLUMNS} FROM stems WHERE node_id {self.db.ids_in('ids')}",
            {"ids": json.dumps(list(node_ids))},
        )
        return {s.node_id: s for s in map(stems_from_row, rows)}

    async def last_progress(
        self, chain_id: str, event: str, *, window: int = 200
    ) -> dict[str, float]:
        """Each node's progress as the chain's latest ``event`` events (``node-progress``,
        ``stems-progress``) among its last ``window`` of them say: how a process learns
        the progress of work that runs in another."""
        rows = await self.db.fetchall(
            "SELECT data FROM events WHERE chain_id = ? AND type = ? ORDER BY id DESC LIMIT ?",
            (chain_id, event, window),
        )
        progress: dict[str, float] = {}
        for (data,) in rows:
            fields = json.loads(data)
            progress.setdefault(fields["node_id"], float(fields["progress"]))
        return progress

    async def ids_with_stems(self) -> set[str]:
        """The nodes whose stem files exist: those whose separation is ready."""
        rows = await self.db.fetchall("SELECT node_id FROM stems WHERE status = 'ready'")
        return {r[0] for r in rows}

    async def all_chain_ids(self) -> set[str]:
        return {r[0] for r in await self.db.fetchall("SELECT id FROM chains")}


class ChainWriter(EventWrites, JobWrites, StemsWrites, AnalysisWrites):
    """The writes, bound to one open transaction (see ``ChainStore.write``)."""

    def __init__(
        self,
        tx: Tx,
        db: Database,
        emitted: list[StoredEvent],
        retention: int,
        retention_bytes: int,
    ) -> None:
        self.tx = tx
        self.db = db
        self.emitted = emitted
        self.retention = retention
        self.retention_bytes = retention_bytes

    async def get_node(self, node_id: str, *, owner: str | None = None) -> Node | None:
        """The node as this transaction sees it (``owner``: as in ``ChainStore.get_node``),
        its chain locked for the rest of the transaction: what the caller checks of it
        stays true until it commits."""
        await self.tx.lock_chain_of(node_id)
        rows = await self.tx.rows(_SELECT_NODE, {"id": node_id, "owner": owner})
        return node_from_row(rows[0]) if rows else None

    async def get_chain(self, chain_id: str, *, owner: str | None = None) -> Chain | None:
        """The chain, locked for the rest of the transaction (see ``get_node``)."""
        await self.tx.lock_chain(chain_id)
        rows = await self.tx.rows(_SELECT_CHAIN, {"id": chain_id, "owner": owner})
        return chain_from_row(rows[0]) if rows else None

    async def create_chain(self, chain: Chain, root: Node) -> None:
        await self.tx.run(
            "INSERT INTO chains (id, title, owner, root_node_id, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                chain.id,
                chain.title,
                chain.owner,
                chain.root_node_id,
                chain.created_at,
                chain.updated_at,
            ),
        )
        await self.tx.run(_INSERT_NODE, node_values(root))

    async def rename_chain(self, chain_id: str, title: str) -> Chain | None:
        rows = await self.tx.rows(
            f"UPDATE chains SET title = ?, updated_at = ? WHERE id = ? RETURNING {CHAIN_COLUMNS}",
            (title, utc_now(), chain_id),
        )
        return chain_from_row(rows[0]) if rows else None

    async def delete_chain(self, chain_id: str) -> list[str] | None:
        """Delete the chain with its nodes, jobs and events; returns its node ids,
        or None if there is no such chain."""
        # The nodes first, in one statement (see delete_subtree); the foreign keys
        # cascade from the chain to its jobs and events, one level each.
        node_ids = await self._ids(
            "DELETE FROM nodes WHERE chain_id = :chain_id RETURNING id", {"chain_id": chain_id}
        )
        deleted = await self.tx.run("DELETE FROM chains WHERE id = ?", (chain_id,))
        return node_ids if deleted > 0 else None

    async def spine_ids(self, chain_id: str) -> list[str]:
        """The spine as this transaction sees it, root first."""
        return await self._ids(
            f"{_with(_SPINE)} SELECT id FROM spine WHERE id IS NOT NULL ORDER BY depth",
            {"chain_id": chain_id},
        )

    async def spine_nodes(self, chain_id: str) -> list[Node]:
        """The spine's nodes as this transaction sees them, root first."""
        return [node_from_row(r) for r in await self.tx.rows(_SPINE_NODES, {"chain_id": chain_id})]

    async def insert_nodes(self, nodes: Sequence[Node]) -> None:
        await self.tx.run_many(_INSERT_NODE, [node_values(n) for n in nodes])

    async def commit_path(self, node_id: str, chain_id: str) -> tuple[list[str], list[str]]:
        """Commit the node and its ancestors; uncommit every committed node off that path.

        Returns the ids committed (root side first) and the ids uncommitted.
        """
        now = utc_now()
        params = {"node_id": node_id, "chain_id": chain_id, "now": now}
        # Uncommit first: the unique index allows one committed child per node at all
        # times. The node's own committed descendants stay (commit is idempotent).
        off = await self._ids(
            f"{_with(_ANCESTORS, _SUBTREE)} UPDATE nodes SET committed = 0, updated_at = :now "
            "WHERE chain_id = :chain_id AND committed = 1 "
            "AND id NOT IN (SELECT id FROM ancestors) "
            "AND id NOT IN (SELECT id FROM subtree) RETURNING id",
            params,
        )
        on = await self._ids(
            f"{_with(_ANCESTORS)} UPDATE nodes SET committed = 1, updated_at = :now "
            "WHERE id IN (SELECT id FROM ancestors) AND committed = 0 RETURNING id",
            params,
        )
        if off or on:
            await self._touch(chain_id, now)
        # RETURNING gives no order: the committed ancestors, root side first.
        ordered = await self._ids(
            f"{_with(_ANCESTORS)} SELECT id FROM ancestors "
            f"WHERE id {self.db.ids_in('ids')} ORDER BY depth DESC",
            {"node_id": node_id, "ids": json.dumps(on)},
        )
        return ordered, off

    async def uncommit_subtree(self, node_id: str, chain_id: str) -> list[str]:
        """Uncommit the node and its committed descendants; returns the ids changed."""
        now = utc_now()
        changed = await self._ids(
            f"{_with(_SUBTREE)} UPDATE nodes SET committed = 0, updated_at = :now "
            "WHERE id IN (SELECT id FROM subtree) AND committed = 1 RETURNING id",
            {"node_id": node_id, "now": now},
        )
        if changed:
            await self._touch(chain_id, now)
        return changed

    async def delete_subtree(self, node_id: str, chain_id: str) -> list[str]:
        """Delete the node and its descendants; returns their ids, parents first.

        One statement deletes the whole subtree, whatever its depth: ``parent_id`` has no
        cascade (SQLite stops a recursive one at 1,000 levels), and its foreign key is
        checked once the statement is done, when no deleted node has a child left.
        """
        params = {"node_id": node_id}
        ids = await self._ids(f"{_with(_SUBTREE)} SELECT id FROM subtree ORDER BY depth", params)
        await self.tx.run(
            f"{_with(_SUBTREE)} DELETE FROM nodes WHERE id IN (SELECT id FROM subtree)", params
        )
        if ids:
            await self._touch(chain_id, utc_now())
        return ids

    async def _ids(self, sql: str, params: dict[str, str]) -> list[str]:
        return [r[0] for r in await self.tx.rows(sql, params)]

    async def _touch(self, chain_id: str, now: str) -> None:
        await self.tx.run("UPDATE chains SET updated_at = ? WHERE id = ?", (now, chain_id))
