"""The registry of worker processes (PostgreSQL only): every SQL statement about it.

Each ``sparrow worker`` (or ``sparrow serve`` with ``SPARROW_WORKER=on``) keeps a
row here and touches it every heartbeat: what it is (host, device, engine,
model), whether its model is loaded and which job it runs. ``GET /api/gpu`` lists
the rows seen within the stall time; older rows belong to dead workers and are
removed by the sweep that retries their jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparrow.store.db import Database


@dataclass(frozen=True)
class WorkerRow:
    id: str
    host: str
    device: str
    engine: str
    model: str
    loaded: bool
    job_id: str | None
    progress: float | None = None  # of the running job


_COLUMNS = "id, host, device, engine, model, loaded, job_id, progress"


class WorkerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def beat(self, worker: WorkerRow) -> None:
        """Register the worker, or say it is alive and what it does now."""
        async with self.db.transaction() as tx:
            await tx.run(
                f"INSERT INTO workers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET device = excluded.device, "
                "loaded = excluded.loaded, job_id = excluded.job_id, "
                "progress = excluded.progress, seen_at = now()",
                (
                    worker.id,
                    worker.host,
                    worker.device,
                    worker.engine,
                    worker.model,
                    worker.loaded,
                    worker.job_id,
                    worker.progress,
                ),
            )

    async def remove(self, worker_id: str) -> None:
        async with self.db.transaction() as tx:
            await tx.run("DELETE FROM workers WHERE id = ?", (worker_id,))

    async def live(self, stall_s: float) -> list[WorkerRow]:
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM workers "
            "WHERE seen_at > now() - make_interval(secs => ?) ORDER BY started_at, id",
            (stall_s,),
        )
        return [WorkerRow(*r) for r in rows]

    async def remove_dead(self, stall_s: float) -> list[str]:
        async with self.db.transaction() as tx:
            rows = await tx.rows(
                "DELETE FROM workers WHERE seen_at <= now() - make_interval(secs => ?) "
                "RETURNING id",
                (stall_s,),
            )
        return [r[0] for r in rows]
