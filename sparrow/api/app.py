"""The application factory and its lifespan.

``create_app(settings)`` builds nothing until the server starts: the lifespan
opens the database, sweeps files left by a crash, ends the work a crash
interrupted, starts the worker, and hands the services to the routes as typed
state (``sparrow.api.deps``). On shutdown the worker stops the running job at
its next decoding step and every event stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import FastAPI

from sparrow import __version__
from sparrow.api import chains, events, export, health, nodes, stems, system
from sparrow.api.errors import install_error_handlers
from sparrow.api.middleware import BodyLimitMiddleware, HeadMiddleware, JSONCORSMiddleware
from sparrow.api.openapi import install_openapi
from sparrow.api.upload import UploadSlots
from sparrow.domain.chains import ChainService
from sparrow.domain.export import ExportService
from sparrow.domain.generation import GenerationService
from sparrow.domain.health import HealthService
from sparrow.domain.keys import KeyService
from sparrow.domain.queue import QueueLimits
from sparrow.domain.stems import StemsService
from sparrow.engines import Engine, GenerationEngine, StemEngine, build_engine, build_stem_engine
from sparrow.events import EventHub
from sparrow.jobs import Worker
from sparrow.media import MediaStore
from sparrow.models import JobKind
from sparrow.settings import Settings
from sparrow.store import ChainStore, Database
from sparrow.store.events import EventLog
from sparrow.store.jobs import JobReads
from sparrow.store.keys import KeyStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the routes reach, built once per running app."""

    settings: Settings
    db: Database
    media: MediaStore
    chains: ChainService
    generation: GenerationService
    stems: StemsService
    exports: ExportService
    keys: KeyService
    engine: GenerationEngine
    stem_engine: StemEngine
    worker: Worker
    hub: EventHub
    events: EventLog
    jobs: JobReads
    uploads: UploadSlots
    health: HealthService


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_path)
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
            worker = jobs = Worker(store, {})
            queue = QueueLimits(settings, retry_after_s=lambda: jobs.mean_job_s)
            generation = GenerationService(
                store, media, engine, settings, queue=queue, wake=jobs.wake, forget=jobs.forget
            )
            stems_service = StemsService(
                store,
                media,
                stem_engine,
                settings,
                keys=keys,
                queue=queue,
                wake=jobs.wake,
                forget=jobs.forget,
                running=lambda: jobs.running,
            )
            jobs.runners[JobKind.GENERATE] = generation
            jobs.runners[JobKind.STEMS] = stems_service
            service = ChainService(store, media, settings, forget=jobs.forget)
            await jobs.recover()
            await service.sweep_orphans()
            jobs.start()
            if settings.preload_model:
                for preloaded in (engine, stem_engine):
                    preloading.add(asyncio.create_task(_preload(preloaded)))
            app.state.services = Services(
                settings=settings,
                db=db,
                media=media,
                chains=service,
                generation=generation,
                stems=stems_service,
                exports=ExportService(store, media, settings),
                keys=keys,
                engine=engine,
                stem_engine=stem_engine,
                worker=jobs,
                hub=hub,
                events=EventLog(db),
                jobs=JobReads(db),
                uploads=UploadSlots(settings.max_concurrent_uploads),
                health=HealthService(
                    db, media, ffmpeg=settings.ffmpeg, worker_alive=lambda: jobs.alive
                ),
            )
            yield
        finally:
            if worker is not None:
                await worker.stop()
            hub.close()  # after the worker: its last events still reach open streams
            await db.close()

    app = FastAPI(
        title="Sparrow",
        version=__version__,
        summary="Backend of an AI music-continuation editor.",
        lifespan=lifespan,
        # Operation ids are the route functions' names: stable, and readable in generated clients.
        generate_unique_id_function=lambda route: route.name,
    )
    install_error_handlers(app)
    install_openapi(app, settings)
    app.add_middleware(
        BodyLimitMiddleware,
        idle_timeout_s=settings.upload_idle_timeout_s,
        exempt={"POST /api/chains"},
    )
    app.add_middleware(HeadMiddleware)
    _install_cors(app, settings)  # outermost, so that every answer carries CORS headers
    app.include_router(health.router)
    app.include_router(chains.router, prefix="/api")
    app.include_router(nodes.router, prefix="/api")
    app.include_router(stems.router, prefix="/api")
    app.include_router(export.router, prefix="/api")
    app.include_router(events.router, prefix="/api")
    app.include_router(system.router, prefix="/api")
    return app


async def _preload(engine: Engine) -> None:
    try:
        await anyio.to_thread.run_sync(engine.load)
    except Exception as exc:  # the first job reports it too, on its nodes
        log.error("the model could not be loaded at start-up: %s", exc)


def _install_cors(app: FastAPI, settings: Settings) -> None:
    origins = settings.cors_origin_list
    # Development (no list, or "*"): any origin may read, never with credentials.
    explicit = bool(origins) and origins != ["*"]
    app.add_middleware(
        JSONCORSMiddleware,
        allow_origins=origins if explicit else ["*"],
        allow_credentials=explicit,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["ETag", "Content-Range", "Accept-Ranges", "Retry-After", "Location"],
    )
