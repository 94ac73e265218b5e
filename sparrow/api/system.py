"""The device and the queue: ``GET /api/gpu``."""

from __future__ import annotations

import sys

from fastapi import APIRouter, Request

from sparrow.api.deps import CallerDep, get_services
from sparrow.api.errors import responses
from sparrow.api.schemas import EngineOut, GpuOut, RunningJobOut

router = APIRouter(tags=["system"])


@router.get(
    "/gpu",
    summary="The engines, their device and the job queue",
    description="Both engines (generation and stems) with their device, model and whether "
    "the model is loaded; GPU memory (null on CPU); jobs waiting; the running job with its "
    "progress when it is the caller's.",
    responses=responses(401),
)
async def gpu(request: Request, caller: CallerDep) -> GpuOut:
    services = get_services(request)
    generation, stems = services.engine.info(), services.stem_engine.info()
    device = generation.device if generation.device.startswith("cuda") else stems.device
    total, used = _vram(device)
    control = services.worker.running
    running = []
    if control is not None and (caller.owner is None or control.job.owner == caller.owner):
        running.append(
            RunningJobOut(
                job_id=control.job.id,
                kind=control.job.kind.value,
                chain_id=control.job.chain_id,
                node_ids=sorted(control.node_ids),
                progress=round(control.progress, 4),
                started_at=control.job.started_at,
            )
        )
    return GpuOut(
        generation=EngineOut.of(generation),
        stems=EngineOut.of(stems),
        vram_total_bytes=total,
        vram_used_bytes=used,
        queue_depth=await services.jobs.queue_depth(),
        running=running,
    )


def _vram(device: str) -> tuple[int | None, int | None]:
    # Only where torch is already in use: the mock engine never imports it.
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None, None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total), int(total - free)
