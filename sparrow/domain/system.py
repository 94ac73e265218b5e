"""The engines, their device and the job queue, as ``GET /api/gpu`` shows them."""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sparrow.engines import EngineInfo, GenerationEngine, StemEngine
from sparrow.jobs import JobControl, JobQueue, JobWorker
from sparrow.models import Caller
from sparrow.store.jobs import JobReads

LOCAL_WORKER = "local"


@dataclass(frozen=True)
class WorkerView:
    """One worker process: where it runs, what it has loaded, whether it runs a job."""

    id: str
    host: str
    device: str
    engine: str
    model: str
    loaded: bool
    running: bool


@dataclass(frozen=True)
class SystemView:
    generation: EngineInfo
    stems: EngineInfo
    vram_total_bytes: int | None
    vram_used_bytes: int | None
    queue_depth: int
    running: list[JobControl]
    """The running job, when the caller may see it (its owner's, or any with auth off)."""
    workers: list[WorkerView]


class SystemService:
    def __init__(
        self,
        engine: GenerationEngine,
        stem_engine: StemEngine,
        jobs: JobQueue,
        reads: JobReads,
        *,
        worker: JobWorker | None,
        cluster_workers: Callable[[], Awaitable[list[WorkerView]]] | None = None,
    ) -> None:
        """``cluster_workers``: every live worker of the cluster (PostgreSQL); without it
        the workers are this process's own, if it runs one."""
        self.engine = engine
        self.stem_engine = stem_engine
        self.jobs = jobs
        self.reads = reads
        self.worker = worker
        self.cluster_workers = cluster_workers
        self.host = socket.gethostname()

    async def workers(self) -> list[WorkerView]:
        if self.cluster_workers is not None:
            return await self.cluster_workers()
        if self.worker is None:
            return []
        info = self.engine.info()
        return [
            WorkerView(
                id=LOCAL_WORKER,
                host=self.host,
                device=info.device,
                engine=info.engine,
                model=info.model,
                loaded=info.loaded,
                running=self.worker.running is not None,
            )
        ]

    async def view(self, caller: Caller) -> SystemView:
        generation, stems = self.engine.info(), self.stem_engine.info()
        device = generation.device if generation.device.startswith("cuda") else stems.device
        total, used = _vram(device)
        control = self.jobs.running
        visible = control is not None and caller.owner in (None, control.job.owner)
        return SystemView(
            generation=generation,
            stems=stems,
            vram_total_bytes=total,
            vram_used_bytes=used,
            queue_depth=await self.reads.queue_depth(),
            running=[control] if visible and control is not None else [],
            workers=await self.workers(),
        )


def _vram(device: str) -> tuple[int | None, int | None]:
    # Only where torch is already in use: the mock engine never imports it.
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None, None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total), int(total - free)
