"""The device and the queue: ``GET /api/gpu``."""

from __future__ import annotations

from sparrow.api.deps import CallerDep, System
from sparrow.api.errors import responses
from sparrow.api.routing import api_router
from sparrow.api.schemas import BatchOut, BatchRowOut, EngineOut, GpuOut, RunningJobOut, WorkerOut

router = api_router("system")


@router.get(
    "/gpu",
    summary="The engines, their device and the job queue",
    description="Both engines (generation and stems) with their device, model and whether "
    "the model is loaded; GPU memory (null on CPU); jobs waiting (cluster-wide); the "
    "running jobs with their progress when they are the caller's; the batch of generation "
    "rows (one per node) decoding together; every live worker.",
    responses=responses(401),
)
async def gpu(caller: CallerDep, system: System) -> GpuOut:
    view = await system.view(caller)
    return GpuOut(
        generation=EngineOut.of(view.generation),
        stems=EngineOut.of(view.stems),
        vram_total_bytes=view.vram_total_bytes,
        vram_used_bytes=view.vram_used_bytes,
        queue_depth=view.queue_depth,
        running=[
            RunningJobOut(
                job_id=running.job.id,
                kind=running.job.kind.value,
                chain_id=running.job.chain_id,
                node_ids=sorted(running.node_ids),
                progress=round(running.progress, 4),
                started_at=running.job.started_at,
            )
            for running in view.running
        ],
        batch=BatchOut(
            max_rows=view.max_rows,
            rows=[
                BatchRowOut(
                    job_id=row.job_id,
                    node_id=row.node_id,
                    progress=round(row.progress, 4),
                    decoding=row.decoding,
                )
                for row in view.rows
            ],
        ),
        workers=[WorkerOut(**vars(worker)) for worker in view.workers],
    )
