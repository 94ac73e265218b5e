"""Stems rows: every SQL statement about them.

A node has at most one stems row. Status changes are guarded by the stems
lifecycle in SQL, as node status changes are, so stems cancelled while their
files were being written are never made ready.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sparrow.models import NodeError, Stems, StemsStatus, stems_sources_of, utc_now
from sparrow.store.db import Row, Tx
from sparrow.store.jobs import STRANDED
from sparrow.store.rows import guarded_update, status_params

STEMS_COLUMNS = (
    "node_id, chain_id, status, job_id, model, sample_rate, channels, frames, files, error, "
    "created_at, updated_at"
)
STEMS_FACTS = frozenset({"model", "sample_rate", "channels", "frames", "files"})


def stems_from_row(row: Row) -> Stems:
    (
        node_id, chain_id, status, job_id, model, sample_rate, channels, frames, files, error,
        created_at, updated_at,
    ) = row  # fmt: skip
    return Stems(
        node_id=node_id,
        chain_id=chain_id,
        status=StemsStatus(status),
        job_id=job_id,
        model=model,
        sample_rate=sample_rate,
        channels=channels,
        frames=frames,
        files=json.loads(files) if files else None,
        error=NodeError(**json.loads(error)) if error else None,
        created_at=created_at,
        updated_at=updated_at,
    )


SELECT_STEMS = f"SELECT {STEMS_COLUMNS} FROM stems WHERE node_id = ?"


class StemsWrites:
    """Stems writes inside a write transaction (mixed into ``ChainWriter``)."""

    tx: Tx

    async def _stems_rows(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Row]:
        return await self.tx.rows(sql, params)

    async def get_stems(self, node_id: str) -> Stems | None:
        rows = await self._stems_rows(SELECT_STEMS, (node_id,))
        return stems_from_row(rows[0]) if rows else None

    async def queue_stems(self, node_id: str, chain_id: str, job_id: str) -> Stems:
        """A new stems row, queued for the job; replaces one that failed or was cancelled."""
        now = utc_now()
        rows = await self._stems_rows(
            "INSERT INTO stems (node_id, chain_id, status, job_id, created_at, updated_at) "
            "VALUES (?, ?, 'queued', ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
            "status = 'queued', job_id = excluded.job_id, error = NULL, model = NULL, "
            "sample_rate = NULL, channels = NULL, frames = NULL, files = NULL, "
            f"updated_at = excluded.updated_at RETURNING {STEMS_COLUMNS}",
            (node_id, chain_id, job_id, now, now),
        )
        return stems_from_row(rows[0])

    async def job_stems(self, job_id: str, status: StemsStatus) -> list[Stems]:
        rows = await self._stems_rows(
            f"SELECT {STEMS_COLUMNS} FROM stems WHERE job_id = ? AND status = ? ORDER BY rowid",
            (job_id, status.value),
        )
        return [stems_from_row(r) for r in rows]

    async def stranded_stems(self, job_id: str | None = None) -> list[str]:
        """Node ids of stems queued or separating that no job will finish (see
        ``JobWrites.stranded_node_ids``)."""
        rows = await self._stems_rows(
            "SELECT node_id FROM stems WHERE status IN ('queued', 'separating') AND "
            + (STRANDED if job_id is None else "job_id = :job_id")
            + " ORDER BY rowid",
            {"job_id": job_id},
        )
        return [r[0] for r in rows]

    async def set_stems_status(
        self,
        node_id: str,
        status: StemsStatus,
        *,
        error: NodeError | None = None,
        facts: dict[str, Any] | None = None,
    ) -> Stems | None:
        """Move a node's stems to ``status`` if the lifecycle allows it from where they are.

        ``facts`` sets model, sample_rate, channels, frames and files with the change.
        Returns the changed row, or None when there is none or the change is not allowed.
        """
        values = dict(facts or {})
        if not values.keys() <= STEMS_FACTS:
            raise ValueError(f"not stems facts: {sorted(values.keys() - STEMS_FACTS)}")
        if "files" in values:
            values["files"] = json.dumps(values["files"])
        await self.tx.lock_chain_of(node_id)  # the chain first, as every writer takes it
        sql = guarded_update("stems", "node_id", STEMS_COLUMNS, stems_sources_of(status), values)
        rows = await self._stems_rows(sql, status_params(status, error, node_id, **values))
        return stems_from_row(rows[0]) if rows else None
