"""The engines, their device and the job queue, as ``GET /api/gpu`` shows them."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Protocol

from sparrow.engines import Engine, EngineInfo, StemEngine
from sparrow.engines.batching import RowDecoder, RowView
from sparrow.jobs import JobControl, JobQueue, JobWorker
from sparrow.models import Caller, Job
from sparrow.store.jobs import JobReads

LOCAL_WORKER = "local"


class Cluster(Protocol):
    """What the system view reads of a cluster (``sparrow.cluster.ClusterView``)."""

    async def state(self) -> tuple[list[WorkerView], list[RunningJob]]:
        """Every live worker, and the jobs they run now (one read of the registry)."""
        ...


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
class RunningJob:
    """A job running now, in this process or on a worker of the cluster."""

    job: Job
    node_ids: frozenset[str]  # still wanted
    progress: float  # of the whole job, 0..1

    @classmethod
    def of(cls, control: JobControl) -> RunningJob:
        return cls(control.job, frozenset(control.node_ids), control.progress)


@dataclass(frozen=True)
class SystemView:
    generation: EngineInfo
    stems: EngineInfo
    vram_total_bytes: int | None
    vram_used_bytes: int | None
    queue_depth: int
    running: list[RunningJob]
    """The running jobs the caller may see (its owner's, or any with auth off)."""
    workers: list[WorkerView]
    max_rows: int
    rows: list[RowView]
    """This process's generation rows the caller may see, decoding then waiting."""


class SystemService:
    def __init__(
        self,
        engine: Engine,
        stem_engine: StemEngine,
        jobs: JobQueue,
        reads: JobReads,
        *,
        worker: JobWorker | None,
        batcher: RowDecoder,
        cluster: Cluster | None = None,
    ) -> None:
        """``cluster``: every live worker of the cluster and what runs there (PostgreSQL);
        without it the workers and running jobs are this process's own."""
        self.engine = engine
        self.stem_engine = stem_engine
        self.jobs = jobs
        self.reads = reads
        self.worker = worker
        self.batcher = batcher
        self.cluster = cluster
        self.host = socket.gethostname()

    async def state(self) -> tuple[list[WorkerView], list[RunningJob]]:
        """The workers, and the jobs they run: the cluster's, or this process's own."""
        if self.cluster is not None:
            return await self.cluster.state()
        running = [RunningJob.of(control) for control in list(self.jobs.running.values())]
        if self.worker is None:
            return [], running
        info = self.engine.info()
        local = WorkerView(
            id=LOCAL_WORKER,
            host=self.host,
            device=info.device,
            engine=info.engine,
            model=info.model,
            loaded=info.loaded,
            running=bool(self.worker.running),
        )
        return [local], running

    async def view(self, caller: Caller) -> SystemView:
        generation, stems = self.engine.info(), self.stem_engine.info()
        device = generation.device if generation.device.startswith("cuda") else stems.device
        total, used = _vram(device)
        workers, running = await self.state()
        return SystemView(
            generation=generation,
            stems=stems,
            vram_total_bytes=total,
            vram_used_bytes=used,
            queue_depth=await self.reads.queue_depth(),
            running=[r for r in running if caller.owner in (None, r.job.owner)],
            workers=workers,
            max_rows=self.batcher.max_rows,
            rows=[r for r in self.batcher.rows() if caller.owner in (None, r.owner)],
        )


def _vram(device: str) -> tuple[int | None, int | None]:
    # Only where torch is already in use: the mock engine never imports it.
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None, None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total), int(total - free)
