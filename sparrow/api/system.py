"""The device and the queue: ``GET /api/gpu``."""

from __future__ import annotations

from fastapi import APIRouter

from sparrow.api.deps import CallerDep, System
from sparrow.api.errors import responses
from sparrow.api.schemas import EngineOut, GpuOut, RunningJobOut, WorkerOut

router = APIRouter(tags=["system"])


@router.get(
    "/gpu",
    summary="The engines, their device and the job queue",
    description="Both engines (generation and stems) with their device, model and whether "
    "the model is loaded; GPU memory (null on CPU); jobs waiting (cluster-wide); the "
    "running job with its progress when it is the caller's; every live worker.",
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
        workers=[WorkerOut(**vars(worker)) for worker in view.workers],
    )
