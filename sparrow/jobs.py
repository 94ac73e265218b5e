"""The durable job queue, as the services see it, and its worker: one task that owns
the device.

Jobs are rows in SQLite (``sparrow.store.jobs``). The services reach the queue
through ``JobQueue`` alone (``wake``, ``forget``, ``running``); ``LocalQueue``
is the one of a single process, driven by the ``Worker``, which is given a
runner per job kind when it is built. The worker claims queued jobs — the oldest
of the owner with the fewest jobs running, so one key's many requests do not
hold everyone else's back — and runs up to ``concurrency`` of them at once
(``SPARROW_MAX_BATCH``): their generation rows decode as one batch in the
engine's ``Batcher``. It deletes a job's row when its runner returns; the
outcome lives on the job's nodes. It sleeps until ``wake()`` when the queue is
empty or it runs all it may. A runner that raises fails its own job only: the
worker logs it and carries on.

Cancellation is cooperative: ``forget(node_ids)`` drops nodes from the running
jobs (they were cancelled or deleted); a row whose node is no longer wanted
leaves the batch at the next decoding step, and once none of a job's nodes is
wanted, its ``cancel`` flag is set. On shutdown the running jobs are stopped the
same way, marked as interrupted.

At start-up, before the worker runs, ``recover`` asks each runner to end what a
job running when the process died had left unfinished (nodes or stems left
queued or generating become ``error`` with code ``interrupted``: the lifecycle
has no way back to ``queued``). Jobs that were still queued stay, and run.

A job never stays half-ended while the server runs. The runners write each
job's end (its nodes' last status) ``persistently``: a write the storage
refuses (disk full, database locked) is retried with backoff until it goes
through, so a node ends ``ready`` or ``error`` as soon as storage is back, with
no restart. Once the runner returns, the worker ends whatever of the job is
still queued or running (a runner that failed before it could) and removes the
job's row, persistently too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sparrow.errors import SparrowError, StorageUnavailable
from sparrow.models import Job, JobKind, NodeError
from sparrow.store import ChainStore, ChainWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

INTERRUPTED = NodeError(
    "interrupted", "The server stopped while this work was running; ask for it again."
)
UNFINISHED = NodeError("internal", "The job failed unexpectedly; the error has been logged.")
FIRST_RETRY_S = 0.1
MAX_RETRY_S = 5.0


def storage_error(exc: OSError | StorageUnavailable, what: str) -> NodeError:
    """What a node (or its stems) records when its ``what`` ("generated audio") could
    not be written: the same code whichever job met it."""
    if isinstance(exc, StorageUnavailable):
        return NodeError(exc.code, exc.detail)
    reason = (exc.strerror or type(exc).__name__).lower()
    return NodeError("storage_unavailable", f"The {what} could not be saved ({reason}).")


async def persistently(write: Callable[[], Awaitable[T]], what: str) -> T:
    """``await write()`` until the storage takes it: ``StorageUnavailable`` is retried
    with exponential backoff (``FIRST_RETRY_S`` up to ``MAX_RETRY_S``), anything else
    raised. For writes that must happen, such as the end of a job; ``write`` must be
    safe to repeat (status changes guarded by the lifecycle are)."""
    delay = FIRST_RETRY_S
    failures = 0
    while True:
        try:
            result = await write()
        except StorageUnavailable as exc:
            failures += 1
            if failures == 1 or delay >= MAX_RETRY_S:
                log.warning("%s: %s; retrying every %.1f s at most", what, exc.detail, MAX_RETRY_S)
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_S, delay * 2)
            continue
        if failures:
            log.info("%s: done after %d failed attempt(s)", what, failures)
        return result


@dataclass(eq=False)
class JobControl:
    """What the worker and the API share about a running job."""

    job: Job
    node_ids: set[str] = field(default_factory=set)  # nodes still wanted
    cancel: threading.Event = field(default_factory=threading.Event)
    shutting_down: bool = False
    # With shutting_down: leave the job's work as it is (nodes stay generating), for the
    # queue to run it again elsewhere, rather than ending it interrupted.
    hand_back: bool = False
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

    async def recover(
        self, w: ChainWriter, job_id: str | None = None, error: NodeError = INTERRUPTED
    ) -> int:
        """End as ``error`` what is still queued or running of one job (``job_id``), or of
        every job that was running when the process died (None); returns how many."""
        ...


class JobQueue(Protocol):
    """What the services need of the job queue: a job is queued inside the transaction
    that creates its rows (``enqueue``), so a rolled-back request leaves no job; the queue
    is told once it has committed (``wake``), is told what is no longer wanted
    (``forget``), and says what runs in this process."""

    mean_job_s: float  # for Retry-After estimates

    async def enqueue(self, w: ChainWriter, job: Job) -> None:
        """Queue the job, in the caller's transaction."""
        ...

    def wake(self) -> None:
        """A job was queued (and committed): start it if a worker is idle."""
        ...

    def forget(self, node_ids: Collection[str]) -> None:
        """These nodes were cancelled or deleted: stop working for them."""
        ...

    @property
    def running(self) -> Mapping[str, JobControl]:
        """The jobs running in this process now, by id."""
        ...


class JobWorker(Protocol):
    """What runs jobs in this process: the in-process ``Worker`` (SQLite) or a
    ``sparrow.cluster.ClusterWorker`` (PostgreSQL)."""

    async def recover(self) -> int: ...

    def start(self) -> None: ...

    async def stop(self, grace_s: float = 5.0) -> None: ...

    @property
    def running(self) -> Mapping[str, JobControl]: ...

    @property
    def alive(self) -> bool: ...


class WorkerSide(Protocol):
    """A queue as the process that runs its jobs holds it: it knows the running jobs."""

    running: dict[str, JobControl]
    mean_job_s: float


def forget_running(running: Mapping[str, JobControl], node_ids: Collection[str]) -> None:
    """Tell every running job these nodes are no longer wanted."""
    for control in list(running.values()):
        control.forget(node_ids)


class LocalQueue:
    """The ``JobQueue`` of one process: the in-process ``Worker`` drives it."""

    def __init__(self) -> None:
        self.running: dict[str, JobControl] = {}
        self.woken = asyncio.Event()
        self.mean_job_s = 10.0  # moving average, for Retry-After estimates

    async def enqueue(self, w: ChainWriter, job: Job) -> None:
        await w.insert_job(job)  # the row is the queue

    def wake(self) -> None:
        self.woken.set()

    def forget(self, node_ids: Collection[str]) -> None:
        forget_running(self.running, node_ids)


class Execution:
    """Runs one claimed job with the runner of its kind and ends it: the one way jobs run,
    whichever worker claimed them."""

    def __init__(
        self, store: ChainStore, queue: WorkerSide, runners: dict[JobKind, Runner]
    ) -> None:
        self.store = store
        self.queue = queue
        self.runners = runners

    async def run(self, job: Job, *, hand_back: bool = False) -> bool:
        """Run the job; returns whether it was handed back (``hand_back``: a stop leaves the
        job's work as it is, for the queue to run again) instead of ended."""
        control = self.queue.running[job.id] = JobControl(job, hand_back=hand_back)
        error = UNFINISHED
        try:
            await self.runners[job.kind].run(job, control)
        except Exception as exc:
            # A failed job fails that job, never the worker.
            log.exception("job %s (%s) failed", job.id, job.kind)
            if isinstance(exc, SparrowError):
                error = NodeError(exc.code, exc.detail)
        finally:
            self.queue.running.pop(job.id, None)
            elapsed = time.monotonic() - control.started
            self.queue.mean_job_s = 0.8 * self.queue.mean_job_s + 0.2 * elapsed
        if control.shutting_down and control.hand_back:
            return True
        await persistently(lambda: self.end(job, error), f"ending job {job.id}")
        return False

    def stop(self) -> None:
        """Stop the running jobs at their next step (a shutdown)."""
        for running in list(self.queue.running.values()):
            running.shutting_down = True
            running.cancel.set()

    async def end(self, job: Job, error: NodeError) -> int:
        """End what the runner left of the job (nothing, unless it failed) with ``error``,
        and remove its row; returns how many pieces of work it ended."""
        async with self.store.write() as w:
            left = sum([await runner.recover(w, job.id, error) for runner in self.runners.values()])
            await w.delete_job(job.id)
        if left:
            log.warning(
                "job %s left %d piece(s) of work unfinished; ended as %s", job.id, left, error.code
            )
        return left


class Worker:
    """Runs the jobs of a ``LocalQueue``, up to ``concurrency`` at once, with the runner of
    each kind."""

    def __init__(
        self,
        store: ChainStore,
        queue: LocalQueue,
        runners: dict[JobKind, Runner],
        *,
        concurrency: int = 1,
    ) -> None:
        self.store = store
        self.queue = queue
        self.runners = runners
        self.concurrency = concurrency
        self.execution = Execution(store, queue, runners)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

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
    def running(self) -> Mapping[str, JobControl]:
        """The jobs this worker runs now, by id."""
        return self.queue.running

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop the running jobs at their next step, let them record that, and end the loop.

        A job that cannot stop in ``grace_s`` (a model still loading) is abandoned:
        its nodes stay ``generating`` until the next start-up's recovery.
        """
        self._stopping.set()
        self.execution.stop()
        self.queue.wake()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout=grace_s)
        except TimeoutError:
            log.error("the running jobs did not stop within %.0f s; abandoned", grace_s)
        self._task = None

    async def _run(self) -> None:
        jobs: set[asyncio.Task[bool]] = set()
        try:
            while not self._stopping.is_set():
                self.queue.woken.clear()
                if len(jobs) >= self.concurrency:
                    await self.queue.woken.wait()  # a job ended, or a stop
                    continue
                try:
                    async with self.store.write() as w:
                        job = await w.claim_next_job()
                except Exception:
                    log.exception("cannot read the job queue; retrying")
                    await asyncio.sleep(1)
                    continue
                if job is None:
                    await self.queue.woken.wait()
                    continue
                if self._stopping.is_set():  # claimed while stopping: it waits for the next start
                    async with self.store.write() as w:
                        await w.requeue_job(job.id, counted=False)
                    break
                task = asyncio.create_task(self.execution.run(job), name=f"sparrow-job-{job.id}")
                jobs.add(task)

                def ended(task: asyncio.Task[bool]) -> None:
                    jobs.discard(task)
                    self.queue.wake()  # room for the next job

                task.add_done_callback(ended)
        finally:
            if jobs:  # stopping: the running jobs end at their next step
                await asyncio.gather(*jobs, return_exceptions=True)
