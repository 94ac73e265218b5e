"""The composition root: one function builds everything a running Sparrow uses.

``running_services(settings)`` opens the database, builds the media store, the
engines, the job queue and every domain service, ends the work a crash left
unfinished, sweeps orphaned files, starts the worker, and hands back
``Services``; leaving the block stops the worker (the running jobs at their next
decoding step), ends every event stream and closes the database. The API's
lifespan, the command line and the tests all build Sparrow through it, so
there is one wiring, not one per caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from sparrow.domain.analysis import Analyser
from sparrow.domain.chains import ChainService
from sparrow.domain.events import EventsService
from sparrow.domain.export import ExportService
from sparrow.domain.generation import GenerationService
from sparrow.domain.health import HealthService
from sparrow.domain.keys import KeyService
from sparrow.domain.queue import QueueLimits
from sparrow.domain.stems import StemsService
from sparrow.domain.system import SystemService
from sparrow.domain.uploads import UploadSlots
from sparrow.engines import Engine, build_decoder, build_engine, build_stem_engine
from sparrow.engines.batching import RowDecoder
from sparrow.events import EventHub
from sparrow.heap import settle_heap
from sparrow.jobs import JobQueue, JobWorker, LocalQueue, Runner, Worker
from sparrow.media import MediaStore
from sparrow.models import JobKind
from sparrow.settings import Settings
from sparrow.store import ChainStore, Database, open_database
from sparrow.store.events import EventLog
from sparrow.store.jobs import JobReads
from sparrow.store.keys import KeyStore

if TYPE_CHECKING:
    from sparrow.cluster import Cluster

log = logging.getLogger(__name__)

SHARED_SWEEP_S = 3600.0  # with PostgreSQL, orphaned files are removed once an hour old


@dataclass(frozen=True)
class Services:
    """Everything the routes reach, built once per running Sparrow."""

    settings: Settings
    db: Database
    media: MediaStore
    hub: EventHub
    worker: JobWorker | None  # None: this process runs no jobs (SPARROW_WORKER)
    analyser: Analyser | None  # runs where the jobs run
    chains: ChainService
    generation: GenerationService
    stems: StemsService
    exports: ExportService
    keys: KeyService
    events: EventsService
    system: SystemService
    health: HealthService
    uploads: UploadSlots


@asynccontextmanager
async def running_services(settings: Settings) -> AsyncIterator[Services]:
    """Sparrow, built from ``settings`` and running for the block (see the module docstring)."""
    db = open_database(settings)
    hub = EventHub(settings.sse_queue_limit)
    cluster: Cluster | None = None
    worker: JobWorker | None = None
    analyser: Analyser | None = None
    batcher: RowDecoder | None = None
    preloading: set[asyncio.Task[None]] = set()
    try:
        await db.open()
        media = MediaStore(settings.data_dir, min_free_bytes=settings.min_free_bytes)
        media.ensure()
        if db.kind == "postgresql":
            cluster = await _open_cluster(db, hub, settings)
        store = ChainStore(
            db,
            hub,
            event_retention=settings.event_retention,
            event_retention_bytes=settings.event_retention_bytes,
            announce=cluster.feed.announce if cluster is not None else None,
        )
        engine, batcher = build_decoder(settings, build_engine(settings))
        stem_engine = build_stem_engine(settings)
        keys = KeyService(KeyStore(db), enabled=settings.auth == "on")
        local: LocalQueue | None = None  # the queue of one process, driven by its Worker
        queue: JobQueue
        if cluster is None:
            queue = local = LocalQueue()
        else:
            queue = cluster.queue
        limits = QueueLimits(settings, retry_after_s=lambda: queue.mean_job_s)
        uploads = UploadSlots(settings.max_concurrent_uploads)
        chains = ChainService(store, media, settings, jobs=queue, uploads=uploads)
        generation = GenerationService(
            store, media, engine, settings, limits=limits, jobs=queue, batcher=batcher
        )
        stems = StemsService(
            store, media, stem_engine, settings, keys=keys, limits=limits, jobs=queue
        )
        runners: dict[JobKind, Runner] = {JobKind.GENERATE: generation, JobKind.STEMS: stems}
        if _runs_worker(settings, db):
            if cluster is not None:
                worker = cluster.worker(store, runners, engine.info)
            else:
                assert local is not None
                worker = Worker(store, local, runners, concurrency=settings.max_batch)
            await worker.recover()
            analyser = Analyser(store, media, settings)
        # Shared by other processes, the data dir may hold files a moment ahead of their rows.
        await chains.sweep_orphans(older_than_s=0 if db.kind == "sqlite" else SHARED_SWEEP_S)
        if worker is not None:
            worker.start()
        if analyser is not None:
            analyser.start()
        if settings.preload_model:
            for preloaded in (engine, stem_engine):
                preloading.add(asyncio.create_task(_preload(preloaded)))
        running = worker
        settle_heap()
        yield Services(
            settings=settings,
            db=db,
            media=media,
            hub=hub,
            worker=worker,
            analyser=analyser,
            chains=chains,
            generation=generation,
            stems=stems,
            exports=ExportService(store, media, settings),
            keys=keys,
            events=EventsService(
                store, EventLog(db), hub, cluster.feed if cluster is not None else None
            ),
            system=SystemService(
                engine,
                stem_engine,
                queue,
                JobReads(db),
                worker=worker,
                batcher=batcher,
                cluster=cluster.view if cluster is not None else None,
            ),
            health=HealthService(
                db,
                media,
                ffmpeg=settings.ffmpeg,
                # A process without a worker by design is not waiting for one.
                worker_alive=lambda: running is None or running.alive,
            ),
            uploads=uploads,
        )
    finally:
        if analyser is not None:
            await analyser.stop()
        if worker is not None:
            await worker.stop()
        if batcher is not None:
            await anyio.to_thread.run_sync(batcher.close)
        if cluster is not None:
            await cluster.close()
        hub.close()  # after the worker: its last events still reach open streams
        await db.close()


def _runs_worker(settings: Settings, db: Database) -> bool:
    """SPARROW_WORKER: ``auto`` runs one in-process with SQLite, none with PostgreSQL."""
    return settings.worker == "on" or (settings.worker == "auto" and db.kind == "sqlite")


async def _open_cluster(db: Database, hub: EventHub, settings: Settings) -> Cluster:
    # Imported here: the embedded default runs without psycopg and procrastinate.
    from sparrow.cluster import Cluster
    from sparrow.store.postgres import PostgresDatabase

    assert isinstance(db, PostgresDatabase)
    cluster = Cluster(db, hub, settings)
    await cluster.open()
    return cluster


async def _preload(engine: Engine) -> None:
    try:
        await anyio.to_thread.run_sync(engine.load)
    except Exception as exc:  # the first job reports it too, on its nodes
        log.error("the model could not be loaded at start-up: %s", exc)
