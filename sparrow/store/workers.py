"""The registry of worker processes (PostgreSQL only): every SQL statement about it.

Each ``sparrow worker`` (or ``sparrow serve`` with ``SPARROW_WORKER=on``) keeps a
row here and touches it every heartbeat: what it is (host, device, engine,
model), whether its model is loaded and which jobs it runs (several at once: their
generation rows share one batch). ``GET /api/gpu`` lists
the rows seen within the stall time; older rows belong to dead workers and are
removed by the sweep that retries their jobs.
"""

from __future__ import annotations

import json
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
    jobs: tuple[tuple[str, float], ...] = ()  # (job id, progress 0..1) of each running job


_COLUMNS = "id, host, device, engine, model, loaded, jobs"


class WorkerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def beat(self, worker: WorkerRow) -> None:
        """Register the worker, or say it is alive and what it does now."""
        async with self.db.transaction() as tx:
            await tx.run(
                f"INSERT INTO workers ({_COLUMNS}, job_id, progress) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET device = excluded.device, "
                "loaded = excluded.loaded, jobs = excluded.jobs, job_id = excluded.job_id, "
                "progress = excluded.progress, seen_at = now()",
                (
                    worker.id,
                    worker.host,
                    worker.device,
                    worker.engine,
                    worker.model,
                    worker.loaded,
                    json.dumps([list(j) for j in worker.jobs]),
                    worker.jobs[0][0] if worker.jobs else None,
                    worker.jobs[0][1] if worker.jobs else None,
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
        return [
            WorkerRow(
                id=r[0],
                host=r[1],
                device=r[2],
                engine=r[3],
                model=r[4],
                loaded=r[5],
                jobs=tuple((job_id, float(progress)) for job_id, progress in json.loads(r[6])),
            )
            for r in rows
        ]

    async def remove_dead(self, stall_s: float) -> list[str]:
        async with self.db.transaction() as tx:
            rows = await tx.rows(
                "DELETE FROM workers WHERE seen_at <= now() - make_interval(secs => ?) "
                "RETURNING id",
                (stall_s,),
            )
        return [r[0] for r in rows]
