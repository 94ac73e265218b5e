"""Liveness and readiness, for load balancers and orchestrators (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sparrow.api.deps import get_services
from sparrow.api.schemas import Health, Readiness
from sparrow.audio import ffmpeg_available

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: the database answers, the worker runs and FFmpeg can be run",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
async def readyz(request: Request) -> JSONResponse:
    services = get_services(request)
    checks = {
        "database": await services.db.ping(),
        "worker": services.worker.alive,
        "ffmpeg": ffmpeg_available(services.settings.ffmpeg),
    }
    ready = all(checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
