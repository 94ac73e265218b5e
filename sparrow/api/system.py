"""The device and the queue: ``GET /api/gpu``."""

from __future__ import annotations

import sys

from fastapi import APIRouter, Request

from sparrow.api.deps import get_services
from sparrow.api.schemas import GpuOut, RunningJobOut

router = APIRouter(tags=["system"])


@router.get(
    "/gpu",
    summary="The engine, its device and the job queue",
    description="Device, engine, model, whether the model is loaded, GPU memory (null on "
    "CPU), jobs waiting and the running job with its progress.",
)
async def gpu(request: Request) -> GpuOut:
    services = get_services(request)
    info = services.engine.info()
    total, used = _vram(info.device)
    control = services.worker.running
    running = []
    if control is not None:
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
        engine=info.engine,
        model=info.model,
        device=info.device,
        dtype=info.dtype,
        loaded=info.loaded,
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
