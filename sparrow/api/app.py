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
from fastapi.middleware.cors import CORSMiddleware

from sparrow import __version__
from sparrow.api import chains, health, nodes
from sparrow.api.errors import install_error_handlers
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_path)
        await db.open()
        media = MediaStore(settings.data_dir)
        media.ensure()
        service = ChainService(ChainStore(db), media, settings)
        await service.sweep_orphans()
        app.state.services = Services(settings=settings, db=db, media=media, chains=service)
        try:
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
    _install_cors(app, settings)
    app.include_router(health.router)
    app.include_router(chains.router, prefix="/api")
    app.include_router(nodes.router, prefix="/api")
    return app


def _install_cors(app: FastAPI, settings: Settings) -> None:
    origins = settings.cors_origin_list
    if not origins or origins == ["*"]:
        # Development: any origin may read, but no credentials are ever allowed with "*".
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_credentials=False,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["ETag", "Content-Range", "Accept-Ranges", "Retry-After"],
        )
    else:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["ETag", "Content-Range", "Accept-Ranges", "Retry-After"],
        )
