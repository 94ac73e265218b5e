"""Past one machine: the job queue on procrastinate, ``sparrow worker``, and notifications.

With PostgreSQL (``SPARROW_DATABASE_URL``) the jobs run on procrastinate, a
PostgreSQL task queue: API replicas defer a job in the transaction that creates
its nodes and events (so a rolled-back request leaves no job), and worker
processes, one per GPU, take them. Sparrow's own ``jobs`` row stays the job's
record (its request, owner and attempts); procrastinate's job only carries its
id. The domain's runners run the job exactly as the in-process worker does
(``sparrow.jobs.Execution``).

- **Cancel** reaches the worker running a job wherever it is: ``forget`` sends a
  ``NOTIFY`` (no payload to outgrow), every worker re-reads which of its job's
  nodes are still wanted, and the engine stops at its next step. A re-read every
  second covers a notification lost with a connection.
- **A worker that dies** stops its procrastinate heartbeat. Every worker sweeps
  for jobs whose worker has been silent for most of ``SPARROW_WORKER_STALL_S``
  (one sweeper at a time, under an advisory lock): a job with attempts left is
  queued again, its nodes still ``generating``; after ``SPARROW_JOB_ATTEMPTS``
  its work ends ``interrupted``. No start-up recovery runs here: a process that
  starts never ends another live process's work.
- **SIGTERM** stops the running jobs at their next step and hands them back: each is
  queued again at once, its nodes untouched, and the worker exits.

Why procrastinate, not Celery or Ray: the queue lives in the database that holds
the state, so a job and its rows commit together and there is no second source
of truth (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import psycopg
from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate.jobs import Status

from sparrow.domain.system import RunningJob, WorkerView
from sparrow.engines import EngineInfo
from sparrow.errors import StorageUnavailable
from sparrow.events import ChainDeleted, EventHub
from sparrow.jobs import Execution, JobControl, Runner, forget_running, persistently
from sparrow.models import Job, JobKind, NodeError, new_id
from sparrow.settings import Settings
from sparrow.store import ChainStore, ChainWriter
from sparrow.store.db import Tx
from sparrow.store.events import EventLog
from sparrow.store.jobs import JobReads
from sparrow.store.postgres import CONNECT_TIMEOUT_S, PostgresDatabase, PostgresTx
from sparrow.store.workers import WorkerRow, WorkerStore

log = logging.getLogger(__name__)

QUEUE = "sparrow"
EVENTS_CHANNEL = "sparrow_events"
LISTENER_NAME = "sparrow-listener"  # its application_name
TASK = "sparrow.job"
FORGET_CHANNEL = "sparrow_forget"
SWEEP_LOCK = 0x73706172726F7703
WANTED_POLL_S = 1.0
RECONNECT_S = (0.1, 2.0)  # the first and the longest wait before a listener reconnects

LOST = NodeError(
    "interrupted",
    "The worker running this work stopped responding, and so did every retry; ask for it again.",
)


class HandedBack(Exception):
    """A stopping worker gives its job back to the queue (procrastinate retries it now)."""


class PostgresQueue:
    """The ``JobQueue`` on PostgreSQL: procrastinate holds the queue; every process's
    copy defers and cancels, and a process with a worker also runs jobs."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db
        self.app = App(connector=PsycopgConnector())
        self.running: dict[str, JobControl] = {}
        self.mean_job_s = 10.0
        self._notifying: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        await self.app.open_async(pool=self.db.pool)

    async def close(self) -> None:
        for task in list(self._notifying):
            with contextlib.suppress(Exception):
                await task
        await self.app.close_async()  # the pool is the database's: it stays open

    async def enqueue(self, w: ChainWriter, job: Job) -> None:
        await w.insert_job(job)
        tx = w.tx
        assert isinstance(tx, PostgresTx), "the PostgreSQL queue needs a PostgreSQL store"
        deferrer = self.app.configure_task(TASK, queue=QUEUE, connection=tx.conn)
        await deferrer.defer_async(job_id=job.id)

    def wake(self) -> None:
        pass  # procrastinate's NOTIFY wakes a worker when the transaction commits

    def forget(self, node_ids: Collection[str]) -> None:
        if not node_ids:
            return
        forget_running(self.running, node_ids)  # this process's own jobs: at once
        task = asyncio.create_task(self._notify_forget())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _notify_forget(self) -> None:
        try:
            async with self.db.transaction() as tx:
                await tx.run(f"NOTIFY {FORGET_CHANNEL}")
        except Exception as exc:  # the workers' own re-read finds it within a second
            log.warning("cannot notify the workers of a cancel: %s", exc)


class Listener:
    """A ``LISTEN`` connection that comes back.

    Calls ``handlers[channel](payload)`` for each notification. A lost connection is
    noticed (a failed read, or a health check every few seconds), re-established with
    backoff, and ``on_connect`` called each time it is listening again, so that the
    caller can re-read whatever it might have missed meanwhile.
    """

    def __init__(
        self,
        db: PostgresDatabase,
        handlers: dict[str, Callable[[str], None]],
        on_connect: Callable[[], Awaitable[None]] | None = None,
        *,
        check_s: float = 5.0,
    ) -> None:
        self.db = db
        self.handlers = handlers
        self.on_connect = on_connect
        self.check_s = check_s
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sparrow-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = RECONNECT_S[0]
        while True:
            try:
                async with await self.db.connect(name=LISTENER_NAME) as conn:
                    for channel in self.handlers:
                        await conn.execute(f"LISTEN {channel}")
                    self.connected.set()
                    if self.on_connect is not None:
                        await self.on_connect()
                    delay = RECONNECT_S[0]
                    await self._listen(conn)
            except StorageUnavailable as exc:  # from connect: the database is unreachable
                log.warning("cannot listen for notifications (%s); retrying", exc.detail)
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                self.reconnects += 1
                log.warning("the notification connection was lost (%s); reconnecting", exc)
            await asyncio.sleep(delay)
            delay = min(RECONNECT_S[1], delay * 2)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for notify in conn.notifies(timeout=self.check_s):
                handler = self.handlers.get(notify.channel)
                if handler is not None:
                    handler(notify.payload)
            await conn.execute("SELECT 1")  # quiet for a while: is the connection alive?


class LogFeed:
    """Events across processes: every process publishes to its own subscribers what the
    persisted log holds, when a notification points there.

    A writing transaction notifies ``sparrow_events`` with each chain it gave events
    (``announce``): the payload is the chain's id, never the event (the log stays the one
    source of truth, and a spine-changed event can outgrow NOTIFY's 8000 bytes); a
    rolled-back transaction notifies nothing. On a notification the feed reads the chain's
    log after the last id it published here and hands the events to the hub, in id
    order. It reads only chains someone here follows (``track``). A lost listening
    connection is re-established and every tracked chain read again from its last id,
    so nothing is missed; followers skip what they already have, so nothing is given
    twice.
    """

    def __init__(self, db: PostgresDatabase, hub: EventHub, log: EventLog) -> None:
        self.db = db
        self.hub = hub
        self.log = log
        self._last: dict[str, int] = {}  # per tracked chain: the last id published here
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._listener = Listener(db, {EVENTS_CHANNEL: self._notified}, self._catch_up)
        self._task: asyncio.Task[None] | None = None

    async def announce(self, tx: Tx, chain_ids: set[str]) -> None:
        for chain_id in sorted(chain_ids):
            await tx.run("SELECT pg_notify(?, ?)", (EVENTS_CHANNEL, chain_id))

    async def start(self) -> None:
        self._listener.start()
        self._task = asyncio.create_task(self._publish_loop(), name="sparrow-log-feed")
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await self._listener.connected.wait()

    async def stop(self) -> None:
        await self._listener.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def track(self, chain_id: str) -> None:
        """Start reading the chain's log for this process (a follower is about to read the
        log itself: from here on, the feed publishes everything after what it reads)."""
        if chain_id in self._last:
            return
        window = await self.log.window(chain_id)
        if window is not None and chain_id not in self._last:
            self._last[chain_id] = window[1]
            self._poke(chain_id)  # a notification may have come before the cursor existed

    def _notified(self, chain_id: str) -> None:
        if chain_id in self._last:
            self._poke(chain_id)

    def _poke(self, chain_id: str) -> None:
        self._pending.add(chain_id)
        self._wake.set()

    async def _catch_up(self) -> None:
        for chain_id in list(self._last):
            self._poke(chain_id)

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            chains, self._pending = self._pending, set()
            for chain_id in chains:
                try:
                    await self._publish(chain_id)
                except Exception as exc:  # read again at the next notification or reconnect
                    log.warning("cannot read the event log of chain %s: %s", chain_id, exc)
                    self._pending.add(chain_id)

    async def _publish(self, chain_id: str) -> None:
        if self.hub.subscriber_count(chain_id) == 0:
            self._last.pop(chain_id, None)  # nobody follows it here any more
            return
        last = self._last.get(chain_id)
        if last is None:
            return
        events = await self.log.after(chain_id, last)
        if events:
            self._last[chain_id] = events[-1].id
            self.hub.publish(events)  # a chain-deleted event ends the chain's streams
            if events[-1].name == ChainDeleted.name:
                self._last.pop(chain_id, None)


class ClusterView:
    """The workers of the cluster and their jobs, as ``GET /api/gpu`` shows them on any
    replica: read from the workers' rows, which every heartbeat rewrites."""

    def __init__(self, db: PostgresDatabase, *, stall_s: float) -> None:
        self.registry = WorkerStore(db)
        self.reads = JobReads(db)
        self.stall_s = stall_s

    async def state(self) -> tuple[list[WorkerView], list[RunningJob]]:
        rows = await self.registry.live(self.stall_s)
        running = []
        for row in rows:
            for job_id, progress in row.jobs:
                if (job := await self.reads.get(job_id)) is None:
                    continue
                wanted = frozenset(await self.reads.wanted_ids(job.id))
                running.append(RunningJob(job, wanted, progress))
        return [_view(row) for row in rows], running


def _view(row: WorkerRow) -> WorkerView:
    return WorkerView(
        id=row.id,
        host=row.host,
        device=row.device,
        engine=row.engine,
        model=row.model,
        loaded=row.loaded,
        running=bool(row.jobs),
    )


class Cluster:
    """What a process needs of the cluster, opened and closed together: the log feed
    behind its event streams, the queue, the view of the workers, and a worker when it
    runs one."""

    def __init__(self, db: PostgresDatabase, hub: EventHub, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.feed = LogFeed(db, hub, EventLog(db))
        self.queue = PostgresQueue(db)
        self.view = ClusterView(db, stall_s=settings.worker_stall_s)

    async def open(self) -> None:
        await self.feed.start()
        await self.queue.open()

    async def close(self) -> None:
        """After the worker has stopped, before the hub closes: its last events are out."""
        await self.feed.stop()
        await self.queue.close()

    def worker(
        self,
        store: ChainStore,
        runners: dict[JobKind, Runner],
        engine_info: Callable[[], EngineInfo],
    ) -> ClusterWorker:
        return ClusterWorker(
            self.db,
            store,
            self.queue,
            runners,
            stall_s=self.settings.worker_stall_s,
            attempts=self.settings.job_attempts,
            engine_info=engine_info,
            concurrency=self.settings.max_batch,
        )


class ClusterWorker:
    """One worker process's share of the cluster: it takes jobs from procrastinate, runs
    them with the domain's runners, beats its heartbeat and sweeps for dead workers' jobs.
    """

    def __init__(
        self,
        db: PostgresDatabase,
        store: ChainStore,
        queue: PostgresQueue,
        runners: dict[JobKind, Runner],
        *,
        stall_s: float,
        attempts: int,
        engine_info: Callable[[], EngineInfo],
        concurrency: int = 1,
    ) -> None:
        """``concurrency``: jobs run at once (SPARROW_MAX_BATCH), their generation rows in
        one batch."""
        self.db = db
        self.store = store
        self.queue = queue
        self.execution = Execution(store, queue, runners)
        self.stall_s = stall_s
        self.attempts = attempts
        self.engine_info = engine_info
        self.concurrency = concurrency
        self.id = new_id()
        self.host = socket.gethostname()
        self.workers = WorkerStore(db)
        self.reads = JobReads(db)
        self._forgotten = asyncio.Event()
        self._listener = Listener(db, {FORGET_CHANNEL: lambda _: self._forgotten.set()})
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._side: list[asyncio.Task[None]] = []
        queue.app.task(
            name=TASK,
            queue=QUEUE,
            pass_context=True,
            retry=RetryStrategy(retry_exceptions={HandedBack}),
        )(self._job)

    @property
    def heartbeat_s(self) -> float:
        return self.stall_s / 6

    @property
    def running(self) -> Mapping[str, JobControl]:
        return self.queue.running

    @property
    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def recover(self) -> int:
        return 0  # never at start-up here: the sweep finds dead workers' jobs

    def start(self) -> None:
        self._listener.start()
        self._side = [
            asyncio.create_task(self._beat(), name="sparrow-heartbeat"),
            asyncio.create_task(self._sweep_loop(), name="sparrow-sweep"),
            asyncio.create_task(self._watch_wanted(), name="sparrow-wanted"),
        ]
        self._worker = asyncio.create_task(self._take_jobs(), name="sparrow-procrastinate")

    async def _take_jobs(self) -> None:
        """procrastinate's worker loop, started again when the database drops it (a restart
        of PostgreSQL ends it with an error)."""
        while not self._stopping:
            try:
                await self.queue.app.run_worker_async(
                    queues=[QUEUE],
                    name=f"sparrow-{self.id[:8]}",
                    concurrency=self.concurrency,
                    install_signal_handlers=False,
                    update_heartbeat_interval=self.heartbeat_s,
                    stalled_worker_timeout=self.stall_s,
                    fetch_job_polling_interval=5.0,
                    delete_jobs="always",
                )
            except Exception as exc:
                log.warning("the job queue's worker stopped (%s); starting it again", exc)
                await asyncio.sleep(1.0)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Hand the running jobs back (each stops at its next step and is queued again at
        once) and stop taking jobs."""
        self._stopping = True
        self.execution.stop()
        if self._worker is not None:
            self._worker.cancel()  # procrastinate stops fetching and waits for the job
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout=grace_s)
            except TimeoutError:
                log.error("the running jobs did not stop within %.0f s; abandoned", grace_s)
            except asyncio.CancelledError:
                pass
            self._worker = None
        for task in self._side:
            task.cancel()
        for task in self._side:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._listener.stop()
        with contextlib.suppress(Exception):
            await self.workers.remove(self.id)

    async def _job(self, context: JobContext, job_id: str) -> None:
        """procrastinate's task: claim Sparrow's job row and run it."""
        if self._stopping:
            raise HandedBack(job_id)

        async def claim() -> Job | None:
            async with self.store.write() as w:
                return await w.claim_job(job_id)

        # Persistently: a claim lost to a database blip would leave the job queued forever.
        job = await persistently(claim, f"claiming job {job_id}")
        if job is None:
            return  # its chain was deleted meanwhile
        log.info(
            "job %s (%s, chain %s) started, attempt %d",
            job.id,
            job.kind,
            job.chain_id,
            job.attempts,
        )
        await self._beat_quietly(starting=job)
        handed_back = await self.execution.run(job, hand_back=True)
        await self._beat_quietly()
        if handed_back:

            async def requeue() -> None:
                async with self.store.write() as w:
                    await w.requeue_job(job_id, counted=False)

            await persistently(requeue, f"handing job {job_id} back")
            log.info("job %s handed back to the queue", job_id)
            raise HandedBack(job_id)

    async def _beat_once(self, starting: Job | None = None) -> None:
        """Tell the registry this worker is alive, and what it runs (``starting``: the job
        it is about to run)."""
        info = self.engine_info()
        jobs = [(c.job.id, c.progress) for c in list(self.queue.running.values())]
        if starting is not None and starting.id not in self.queue.running:
            jobs.append((starting.id, 0.0))
        await self.workers.beat(
            WorkerRow(
                id=self.id,
                host=self.host,
                device=info.device,
                engine=info.engine,
                model=info.model,
                loaded=info.loaded,
                jobs=tuple(jobs),
            )
        )

    async def _beat_quietly(self, starting: Job | None = None) -> None:
        """A heartbeat that never fails the job: the next one says it again."""
        try:
            await self._beat_once(starting)
        except Exception as exc:
            log.warning("cannot record this worker's heartbeat: %s", exc)

    async def _beat(self) -> None:
        while True:
            await self._beat_quietly()
            await asyncio.sleep(self.heartbeat_s)

    async def _watch_wanted(self) -> None:
        """Stop working for nodes cancelled or deleted through any replica."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WANTED_POLL_S):
                    await self._forgotten.wait()
            self._forgotten.clear()
            for control in list(self.queue.running.values()):
                if not control.node_ids:
                    continue
                try:
                    wanted = await self.reads.wanted_ids(control.job.id)
                except Exception as exc:
                    log.debug("cannot re-read a running job's nodes: %s", exc)
                    continue
                control.forget(control.node_ids - wanted)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("the sweep for dead workers' jobs failed (%s); retrying", exc)
            await asyncio.sleep(self.heartbeat_s)

    async def sweep(self) -> int:
        """Queue again (or, out of attempts, end) the jobs of workers silent for most of the
        stall time; returns how many it handled. One process sweeps at a time."""
        handled = 0
        silent_s = self.stall_s * 2 / 3  # a live worker beats every sixth of it
        manager = self.queue.app.job_manager
        async with self.db.pool.connection() as conn:
            row = await (
                await conn.execute("SELECT pg_try_advisory_lock(%s)", (SWEEP_LOCK,))
            ).fetchone()
            if row is None or not row[0]:
                return 0
            try:
                stalled = await manager.get_stalled_jobs(
                    queue=QUEUE, task_name=TASK, seconds_since_heartbeat=silent_s
                )
                for stalled_job in stalled:
                    await self._retry_or_end(stalled_job)
                    handled += 1
                await manager.prune_stalled_workers(self.stall_s)
                await self.workers.remove_dead(self.stall_s)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
        return handled

    async def _retry_or_end(self, stalled: Any) -> None:
        manager = self.queue.app.job_manager
        job_id = str(stalled.task_kwargs["job_id"])
        async with self.store.write() as w:
            job = await w.get_job(job_id)
        if job is None:  # its chain was deleted
            await manager.finish_job(stalled, Status.FAILED, delete_job=True)
            return
        if job.attempts >= self.attempts:
            log.error(
                "job %s lost its worker on its last attempt (%d); ending it", job_id, job.attempts
            )
            await self.execution.end(job, LOST)
            await manager.finish_job(stalled, Status.FAILED, delete_job=True)
            return
        log.warning("job %s lost its worker (attempt %d); queued again", job_id, job.attempts)
        async with self.store.write() as w:
            await w.requeue_job(job_id)
        await manager.retry_job(stalled)
