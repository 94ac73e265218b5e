"""The application factory and its lifespan.

``create_app(settings)`` builds nothing until the server starts: the lifespan
runs ``sparrow.services.running_services`` (the one wiring of the whole
program) and hands the services to the routes as typed state
(``sparrow.api.deps``). On shutdown the worker stops the running jobs at their
next decoding step and every event stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sparrow import __version__
from sparrow.api import chains, events, export, health, nodes, stems, system
from sparrow.api.errors import install_error_handlers
from sparrow.api.middleware import BodyLimitMiddleware, HeadMiddleware, JSONCORSMiddleware
from sparrow.api.openapi import install_openapi
from sparrow.api.routing import operation_id
from sparrow.api.studio import install_studio
from sparrow.services import running_services
from sparrow.settings import Settings

# The modules of routes, in the order their routes are matched.
ROUTES = (health, chains, nodes, stems, export, events, system)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_services(settings) as services:
            app.state.services = services
            yield

    telemetry = settings.telemetry == "on"
    app = FastAPI(
        title="Sparrow",
        version=__version__,
        summary="Backend of an AI music-continuation editor.",
        lifespan=lifespan,
        # The API's routes in the app's own router, as they are (see sparrow.api.routing).
        routes=[route for module in ROUTES for route in module.router.routes],
        generate_unique_id_function=operation_id,
        telemetry={"tracing": telemetry, "metrics": telemetry, "logs": telemetry},
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
    install_studio(app)
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
