"""The application factory and its lifespan.

``create_app(settings)`` builds nothing until the server starts: the lifespan
opens the database, sweeps files left by a crash, and hands the services to
the routes as typed state (``sparrow.api.deps``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from sparrow import __version__
from sparrow.api import chains, health, nodes
from sparrow.api.errors import install_error_handlers
from sparrow.api.middleware import BodyLimitMiddleware, HeadMiddleware, JSONCORSMiddleware
from sparrow.api.upload import UploadSlots
from sparrow.domain.chains import ChainService
from sparrow.media import MediaStore
from sparrow.settings import Settings
from sparrow.store import ChainStore, Database

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the routes reach, built once per running app."""

    settings: Settings
    db: Database
    media: MediaStore
    chains: ChainService
    uploads: UploadSlots


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_path)
        try:
            await db.open()
            media = MediaStore(settings.data_dir)
            media.ensure()
            service = ChainService(ChainStore(db), media, settings)
            await service.sweep_orphans()
            app.state.services = Services(
                settings=settings,
                db=db,
                media=media,
                chains=service,
                uploads=UploadSlots(settings.max_concurrent_uploads),
            )
            yield
        finally:
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
    app.add_middleware(BodyLimitMiddleware, exempt={"POST /api/chains"})
    app.add_middleware(HeadMiddleware)
    _install_cors(app, settings)  # outermost, so that every answer carries CORS headers
    app.include_router(health.router)
    app.include_router(chains.router, prefix="/api")
    app.include_router(nodes.router, prefix="/api")
    return app


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
