"""The durable job queue and node status changes: every SQL statement about them.

A job row lives from the request until the job ends (its outcome is recorded on
its nodes), so the table is the queue: ``queued`` rows wait, at most one row is
``running``. Status changes are guarded by the lifecycle in SQL: a change from a
status the lifecycle does not allow changes nothing, so a node cancelled while
its audio was being written is never made ready.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sparrow.models import Job, JobKind, Node, NodeError, NodeStatus, sources_of, utc_now
from sparrow.store.db import Database, Row, Tx
from sparrow.store.rows import NODE_COLUMNS, guarded_update, node_from_row, status_params

# Jobs waiting that still have work: a job whose nodes (or stems) were all
# cancelled or discarded holds no place in the queue (the worker skips it).
WAITING_JOBS = (
    "SELECT count(*) FROM jobs AS j WHERE j.status = 'queued' AND ("
    "EXISTS (SELECT 1 FROM nodes WHERE job_id = j.id AND status = 'queued') OR "
    "EXISTS (SELECT 1 FROM stems WHERE job_id = j.id AND status = 'queued'))"
)

# Rows whose job no worker will run: it was running when the process died, or is gone.
STRANDED = "(job_id IS NULL OR job_id IN (SELECT id FROM jobs WHERE status = 'running'))"

AUDIO_FACTS = frozenset({"duration_s", "sample_rate", "channels", "frames", "audio_sha256"})

_CLAIM = "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 WHERE id = "
_JOB_COLUMNS = "id, chain_id, kind, owner, request, created_at, started_at, attempts"
_INSERTED_COLUMNS = "id, chain_id, kind, owner, request, created_at, started_at"


def _job(row: Row) -> Job:
    id_, chain_id, kind, owner, request, created_at, started_at, attempts = row
    return Job(
        id=id_,
        chain_id=chain_id,
        kind=JobKind(kind),
        owner=owner,
        request=json.loads(request),
        created_at=created_at,
        started_at=started_at,
        attempts=int(attempts),
    )


class JobWrites:
    """Job and node-status writes inside a write transaction (mixed into ``ChainWriter``)."""

    tx: Tx

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        return await self.tx.rows(sql, params)

    async def insert_job(self, job: Job) -> None:
        await self.tx.run(
            f"INSERT INTO jobs ({_INSERTED_COLUMNS}, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued')",
            (
                job.id,
                job.chain_id,
                job.kind.value,
                job.owner,
                json.dumps(job.request),
                job.created_at,
                job.started_at,
            ),
        )

    async def waiting_jobs(self, owner: str | None = None) -> int:
        """Jobs waiting with work to do: all of them, or those of one owner. The queue stays
        locked for the rest of the transaction, so a job inserted after the count is
        counted by the next one, in any process."""
        await self.tx.lock_queue()
        if owner is None:
            rows = await self._rows(WAITING_JOBS)
        else:
            rows = await self._rows(WAITING_JOBS + " AND j.owner = ?", (owner,))
        return int(rows[0][0])

    async def claim_next_job(self) -> Job | None:
        """Mark a queued job running and return it (one process's queue: SQLite): the
        oldest of the owner with the fewest jobs running, so that jobs run side by side
        are spread across owners."""
        rows = await self._rows(
            _CLAIM + "(SELECT id FROM jobs AS q WHERE status = 'queued' ORDER BY "
            "(SELECT count(*) FROM jobs AS r WHERE r.status = 'running' AND r.owner IS q.owner), "
            f"created_at, rowid LIMIT 1) RETURNING {_JOB_COLUMNS}",
            (utc_now(),),
        )
        return _job(rows[0]) if rows else None

    async def claim_job(self, job_id: str) -> Job | None:
        """Mark this job running, one more attempt, and return it; None if it is gone (its
        chain was deleted) — the queue on PostgreSQL chose it."""
        rows = await self._rows(_CLAIM + f"? RETURNING {_JOB_COLUMNS}", (utc_now(), job_id))
        return _job(rows[0]) if rows else None

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    async def requeue_job(self, job_id: str, *, counted: bool = True) -> None:
        """Queue the job again. ``counted``: the attempt it was on failed (its worker died);
        otherwise the attempt is given back (a worker stopping handed the job back)."""
        await self.tx.run(
            "UPDATE jobs SET status = 'queued', started_at = NULL, "
            "attempts = attempts - ? WHERE id = ?",
            (0 if counted else 1, job_id),
        )

    async def delete_job(self, job_id: str) -> None:
        await self.tx.run("DELETE FROM jobs WHERE id = ?", (job_id,))

    async def job_node_ids(self, job_id: str, status: NodeStatus) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM nodes WHERE job_id = ? AND status = ? ORDER BY rowid",
            (job_id, status.value),
        )
        return [r[0] for r in rows]

    async def stranded_node_ids(self, job_id: str | None = None) -> list[str]:
        """Queued or generating nodes that no job will finish: those of ``job_id``, which
        has ended, or (None) those whose job was running when the process died, or is gone."""
        rows = await self._rows(
            "SELECT id FROM nodes WHERE status IN ('queued', 'generating') AND "
            + (STRANDED if job_id is None else "job_id = :job_id")
            + " ORDER BY rowid",
            {"job_id": job_id},
        )
        return [r[0] for r in rows]

    async def delete_running_jobs(self) -> None:
        await self.tx.run("DELETE FROM jobs WHERE status = 'running'")

    async def set_status(
        self,
        node_id: str,
        status: NodeStatus,
        *,
        error: NodeError | None = None,
        audio: dict[str, Any] | None = None,
    ) -> Node | None:
        """Move the node to ``status`` if the lifecycle allows it from where it is.

        ``audio`` sets the audio facts (duration_s, sample_rate, channels, frames,
        audio_sha256) with the change. Returns the changed node, or None when the
        node is gone or its status does not allow the change.
        """
        facts = audio or {}
        if not facts.keys() <= AUDIO_FACTS:
            raise ValueError(f"not audio facts: {sorted(facts.keys() - AUDIO_FACTS)}")
        await self.tx.lock_chain_of(node_id)  # the chain first, as every writer takes it
        sql = guarded_update("nodes", "id", NODE_COLUMNS, sources_of(status), facts)
        rows = await self._rows(sql, status_params(status, error, node_id, **facts))
        return node_from_row(rows[0]) if rows else None


class JobReads:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def queue_depth(self) -> int:
        row = await self.db.fetchone(WAITING_JOBS)
        return int(row[0]) if row else 0

    async def get(self, job_id: str) -> Job | None:
        row = await self.db.fetchone(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    async def wanted_ids(self, job_id: str) -> set[str]:
        """The node ids of the job's nodes or stems still queued or running: what a worker
        running it should still work for."""
        rows = await self.db.fetchall(
            "SELECT id FROM nodes WHERE job_id = :job_id AND status IN ('queued', 'generating') "
            "UNION SELECT node_id FROM stems WHERE job_id = :job_id "
            "AND status IN ('queued', 'separating')",
            {"job_id": job_id},
        )
        return {r[0] for r in rows}
