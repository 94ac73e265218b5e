"""The composition root: one function builds everything a running Sparrow uses.

``running_services(settings)`` opens the database, builds the media store, the
engines, the job queue and every domain service, ends the work a crash left
unfinished, sweeps orphaned files, starts the worker, and hands back
``Services``; leaving the block stops the worker (the running job at its next
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

import anyio

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
from sparrow.engines import Engine, build_engine, build_stem_engine
from sparrow.events import EventHub
from sparrow.jobs import LocalQueue, Worker
from sparrow.media import MediaStore
from sparrow.models import JobKind
from sparrow.settings import Settings
from sparrow.store import ChainStore, Database, open_database
from sparrow.store.events import EventLog
from sparrow.store.jobs import JobReads
from sparrow.store.keys import KeyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """Everything the routes reach, built once per running Sparrow."""

    settings: Settings
    db: Database
    media: MediaStore
    hub: EventHub
    worker: Worker
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
    worker: Worker | None = None
    preloading: set[asyncio.Task[None]] = set()
    try:
        await db.open()
        media = MediaStore(settings.data_dir, min_free_bytes=settings.min_free_bytes)
        media.ensure()
        store = ChainStore(
            db,
            hub,
            event_retention=settings.event_retention,
            event_retention_bytes=settings.event_retention_bytes,
        )
        engine = build_engine(settings)
        stem_engine = build_stem_engine(settings)
        keys = KeyService(KeyStore(db), enabled=settings.auth == "on")
        queue = LocalQueue()
        limits = QueueLimits(settings, retry_after_s=lambda: queue.mean_job_s)
        uploads = UploadSlots(settings.max_concurrent_uploads)
        chains = ChainService(store, media, settings, jobs=queue, uploads=uploads)
        generation = GenerationService(store, media, engine, settings, limits=limits, jobs=queue)
        stems = StemsService(
            store, media, stem_engine, settings, keys=keys, limits=limits, jobs=queue
        )
        worker = running = Worker(
            store, queue, {JobKind.GENERATE: generation, JobKind.STEMS: stems}
        )
        await worker.recover()
        await chains.sweep_orphans()
        worker.start()
        if settings.preload_model:
            for preloaded in (engine, stem_engine):
                preloading.add(asyncio.create_task(_preload(preloaded)))
        yield Services(
            settings=settings,
            db=db,
            media=media,
            hub=hub,
            worker=worker,
            chains=chains,
            generation=generation,
            stems=stems,
            exports=ExportService(store, media, settings),
            keys=keys,
            events=EventsService(store, EventLog(db), hub),
            system=SystemService(engine, stem_engine, queue, JobReads(db)),
            health=HealthService(
                db, media, ffmpeg=settings.ffmpeg, worker_alive=lambda: running.alive
            ),
            uploads=uploads,
        )
    finally:
        if worker is not None:
            await worker.stop()
        hub.close()  # after the worker: its last events still reach open streams
        await db.close()


async def _preload(engine: Engine) -> None:
    try:
        await anyio.to_thread.run_sync(engine.load)
    except Exception as exc:  # the first job reports it too, on its nodes
        log.error("the model could not be loaded at start-up: %s", exc)
