"""The per-chain event log: every SQL statement about events.

``chains.last_event_id`` is each chain's counter; ``emit`` bumps it and writes
the event in the caller's transaction, so an event exists exactly when the
change it describes does. The log keeps the last ``retention`` events of each
chain.
"""

from __future__ import annotations

import json

import aiosqlite

from sparrow.domain.models import utc_now
from sparrow.events import Event, StoredEvent
from sparrow.store.db import Database


class EventWrites:
    """Event writes inside a write transaction (mixed into ``ChainWriter``)."""

    tx: aiosqlite.Connection
    emitted: list[StoredEvent]
    retention: int

    async def emit(self, event: Event) -> StoredEvent:
        async with self.tx.execute(
            "UPDATE chains SET last_event_id = last_event_id + 1 WHERE id = ? "
            "RETURNING last_event_id",
            (event.chain_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise LookupError(f"chain {event.chain_id} does not exist")
        stored = StoredEvent(event.chain_id, int(row[0]), event.name, event.data())
        await self.tx.execute(
            "INSERT INTO events (chain_id, id, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (stored.chain_id, stored.id, stored.name, stored.data_json, utc_now()),
        )
        if stored.id > self.retention:
            await self.tx.execute(
                "DELETE FROM events WHERE chain_id = ? AND id <= ?",
                (stored.chain_id, stored.id - self.retention),
            )
        self.emitted.append(stored)
        return stored


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
