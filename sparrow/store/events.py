"""The per-chain event log: every SQL statement about events.

``chains.last_event_id`` is each chain's counter; ``emit`` bumps it and writes
the event in the caller's transaction, so an event exists exactly when the
change it describes does. The log keeps the last ``retention`` events of each
chain, and no more than ``retention_bytes`` of them (``chains.event_log_bytes``
counts what is kept).
"""

from __future__ import annotations

import json

from sparrow.events import Event, StoredEvent
from sparrow.models import utc_now
from sparrow.store.db import Database, Tx


class EventWrites:
    """Event writes inside a write transaction (mixed into ``ChainWriter``)."""

    tx: Tx
    emitted: list[StoredEvent]
    retention: int
    retention_bytes: int

    async def emit(self, event: Event) -> StoredEvent:
        # Two statements for most events (each one is a trip to the database's thread or
        # over the network): the counter and the log's size move together, and only a
        # log over its retention is pruned.
        data = event.data()
        size = len(json.dumps(data))  # ASCII JSON: characters are bytes
        rows = await self.tx.rows(
            "UPDATE chains SET last_event_id = last_event_id + 1, "
            "event_log_bytes = event_log_bytes + ? WHERE id = ? "
            "RETURNING last_event_id, event_log_bytes",
            (size, event.chain_id),
        )
        if not rows:
            raise LookupError(f"chain {event.chain_id} does not exist")
        row = rows[0]
        stored = StoredEvent(event.chain_id, int(row[0]), event.name, data)
        await self.tx.run(
            "INSERT INTO events (chain_id, id, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (stored.chain_id, stored.id, stored.name, stored.data_json, utc_now()),
        )
        freed = await self._prune(stored.chain_id, stored.id, int(row[1]))
        if freed:
            await self.tx.run(
                "UPDATE chains SET event_log_bytes = event_log_bytes - ? WHERE id = ?",
                (freed, stored.chain_id),
            )
        self.emitted.append(stored)
        return stored

    async def _prune(self, chain_id: str, last_id: int, log_bytes: int) -> int:
        """Keep the last ``retention`` events, and at most ``retention_bytes`` of them (once
        over, trimmed to three quarters of it, so trimming is rare); the newest always
        stays. Returns the bytes freed."""
        cutoff = last_id - self.retention
        if log_bytes > self.retention_bytes:
            excess = log_bytes - self.retention_bytes * 3 // 4
            sizes = await self.tx.rows(
                "SELECT id, length(data) FROM events WHERE chain_id = ? AND id < ? ORDER BY id",
                (chain_id, last_id),
            )
            for event_id, event_bytes in sizes:
                cutoff = max(cutoff, int(event_id))
                excess -= int(event_bytes)
                if excess <= 0:
                    break
        if cutoff <= 0:
            return 0
        # length() counts characters: the JSON is ASCII, so they are bytes.
        freed = await self.tx.rows(
            "DELETE FROM events WHERE chain_id = ? AND id <= ? RETURNING length(data)",
            (chain_id, cutoff),
        )
        return sum(int(r[0]) for r in freed)


class EventLog:
    """Reads of the log."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def after(self, chain_id: str, last_id: int) -> list[StoredEvent]:
        """The retained events of the chain with an id above ``last_id``, in order."""
        rows = await self.db.fetchall(
            "SELECT id, type, data FROM events WHERE chain_id = ? AND id > ? ORDER BY id",
            (chain_id, last_id),
        )
        return [StoredEvent(chain_id, int(r[0]), r[1], json.loads(r[2])) for r in rows]

    async def window(self, chain_id: str) -> tuple[int, int] | None:
        """(oldest retained id, last id) of the chain's log; None if there is no such chain.

        With nothing retained the oldest id is ``last id + 1``.
        """
        row = await self.db.fetchone(
            "SELECT c.last_event_id, (SELECT min(id) FROM events WHERE chain_id = c.id) "
            "FROM chains AS c WHERE c.id = ?",
            (chain_id,),
        )
        if row is None:
            return None
        last = int(row[0])
        return (int(row[1]) if row[1] is not None else last + 1), last
