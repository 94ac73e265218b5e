"""Liveness and readiness, for load balancers and orchestrators (no key needed)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from sparrow.api.deps import HealthDep
from sparrow.api.routing import api_router
from sparrow.api.schemas import Health, Readiness

router = api_router("health", prefix="")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: the database and the data dir take writes, FFmpeg works, the worker runs",
    description="Each check does a little of what requests do (a database write, a small "
    "file in the data dir, a real FFmpeg run checked sample by sample); the answer is kept "
    "for 2 s. `problems` says why each failing check failed.",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
async def readyz(health: HealthDep) -> JSONResponse:
    readiness = await health.readiness()
    body = Readiness(
        status="ready" if readiness.ready else "not_ready",
        checks={name: problem is None for name, problem in readiness.problems.items()},
        problems={name: p for name, p in readiness.problems.items() if p is not None},
    )
    return JSONResponse(body.model_dump(), status_code=200 if readiness.ready else 503)
