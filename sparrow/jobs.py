"""The durable job queue's worker: one task that owns the device.

Jobs are rows in SQLite (``sparrow.store.jobs``). The worker claims the oldest
queued job, hands it to the runner registered for its kind, and deletes the
row when the runner returns; the outcome lives on the job's nodes. It sleeps
until ``wake()`` when the queue is empty. A runner that raises fails its own
job only: the worker logs it and takes the next one.

Cancellation is cooperative: ``forget(node_ids)`` drops nodes from the running
job (they were cancelled or deleted); once none of its nodes is wanted, its
``cancel`` flag is set, and the engine's progress callback stops the batch at
the next decoding step. On shutdown the running job is stopped the same way,
marked as interrupted.

At start-up, before the worker runs, ``recover`` asks each runner to end what a
job running when the process died had left unfinished (nodes or stems left
queued or generating become ``error`` with code ``interrupted``: the lifecycle
has no way back to ``queued``). Jobs that were still queued stay, and run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from sparrow.domain.models import Job, JobKind, NodeError
from sparrow.store import ChainStore, ChainWriter

log = logging.getLogger(__name__)

INTERRUPTED = NodeError(
    "interrupted", "The server stopped while this work was running; ask for it again."
)


@dataclass(eq=False)
class JobControl:
    """What the worker and the API share about the running job."""

    job: Job
    node_ids: set[str] = field(default_factory=set)  # nodes still wanted
    cancel: threading.Event = field(default_factory=threading.Event)
    shutting_down: bool = False
    progress: float = 0.0  # of the whole job
    piece_progress: dict[str, float] = field(default_factory=dict)  # per node, where it differs
    started: float = field(default_factory=time.monotonic)

    def forget(self, node_ids: Collection[str]) -> None:
        """Stop working for these nodes; once none of the job's nodes is wanted, stop the job."""
        mine = self.node_ids.intersection(node_ids)
        if not mine:
            return  # other nodes: not this job's business
        self.node_ids.difference_update(mine)
        if not self.node_ids:
            self.cancel.set()


class Runner(Protocol):
    """Runs the jobs of one kind."""

    async def run(self, job: Job, control: JobControl) -> None:
        """Do the job; record its outcome on its rows. Raising fails this job only."""
        ...

    async def recover(self, w: ChainWriter) -> int:
        """End (as ``INTERRUPTED``) what a job running at a crash left unfinished; how many."""
        ...


class Worker:
    def __init__(self, store: ChainStore, runners: dict[JobKind, Runner]) -> None:
        self.store = store
        self.runners = runners
        self.running: JobControl | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.mean_job_s = 10.0  # moving average, for Retry-After estimates

    async def recover(self) -> int:
        """End the work a crash left unfinished; returns how many nodes and stems it ended."""
        async with self.store.write() as w:
            stranded = sum([await runner.recover(w) for runner in self.runners.values()])
            await w.delete_running_jobs()
        if stranded:
            log.warning("%d piece(s) of work were interrupted by the last shutdown", stranded)
        return stranded

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sparrow-worker")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    def forget(self, node_ids: Collection[str]) -> None:
        """These nodes were cancelled or deleted: stop working for them."""
        if self.running is not None:
            self.running.forget(node_ids)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop the running job at its next step, let it record that, and end the loop.

        A job that cannot stop in ``grace_s`` (a model still loading) is abandoned:
        its nodes stay ``generating`` until the next start-up's recovery.
        """
        self._stopping.set()
        if self.running is not None:
            self.running.shutting_down = True
            self.running.cancel.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout=grace_s)
        except TimeoutError:
            log.error("the running job did not stop within %.0f s; abandoned", grace_s)
        self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                async with self.store.write() as w:
                    job = await w.claim_next_job()
            except Exception:
                log.exception("cannot read the job queue; retrying")
                await asyncio.sleep(1)
                continue
            if job is None:
                await self._wake.wait()
                continue
            if self._stopping.is_set():  # claimed while stopping: it waits for the next start
                async with self.store.write() as w:
                    await w.requeue_job(job.id)
                break
            await self._execute(job)

    async def _execute(self, job: Job) -> None:
        control = self.running = JobControl(job)
        try:
            await self.runners[job.kind].run(job, control)
        except Exception:
            # A failed job fails that job, never the worker.
            log.exception("job %s (%s) failed", job.id, job.kind)
        finally:
            self.running = None
            elapsed = time.monotonic() - control.started
            self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * elapsed
        try:
            async with self.store.write() as w:
                await w.delete_job(job.id)
        except Exception:
            # The row stays 'running'; the next start-up's recovery ends its nodes.
            log.exception("cannot remove finished job %s", job.id)
