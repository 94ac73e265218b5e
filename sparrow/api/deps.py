"""FastAPI dependencies: the way routes reach the services the lifespan built, and the caller.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in its
thread pool, one thread hop per dependency per request, for work that is one
attribute read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security.utils import get_authorization_scheme_param

from sparrow.domain.chains import ChainService
from sparrow.domain.events import EventsService
from sparrow.domain.export import ExportService
from sparrow.domain.generation import GenerationService
from sparrow.domain.health import HealthService
from sparrow.domain.keys import KeyService
from sparrow.domain.stems import StemsService
from sparrow.domain.system import SystemService
from sparrow.models import Caller
from sparrow.services import Services
from sparrow.settings import Settings


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def bearer_token(request: Request) -> str | None:
    """The key in ``Authorization: Bearer <key>``, read as FastAPI's ``HTTPBearer`` reads
    it. Read here rather than through that scheme as a dependency of its own: each
    dependency costs every request its solving (docs/performance.md). The document lists
    the scheme on every /api operation (``sparrow.api.openapi``)."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


async def get_caller(request: Request) -> Caller:
    """Who sends the request: 401 without a valid key when auth is on."""
    return await get_services(request).keys.caller(bearer_token(request))


CallerDep = Annotated[Caller, Depends(get_caller)]


@dataclass(frozen=True, slots=True)
class ChainReads:
    """The chain service and the request's caller, as one dependency: the reads a client
    polls (a node, a chain, the list, the spine) take this rather than ``Chains`` and
    ``CallerDep``, one dependency's solving less per request (docs/performance.md)."""

    chains: ChainService
    caller: Caller


async def get_chain_reads(request: Request) -> ChainReads:
    return ChainReads(get_services(request).chains, await get_caller(request))


Reads = Annotated[ChainReads, Depends(get_chain_reads)]


async def get_stream_caller(
    request: Request,
    chain_id: str,
    token: Annotated[
        str | None,
        Query(
            max_length=200,
            description="A stream token (`POST /api/chains/{chain_id}/stream-token`), for "
            "clients that cannot send Authorization, such as a browser's EventSource.",
        ),
    ] = None,
) -> Caller:
    """The caller of a chain's event stream: a key, or a stream token for that chain."""
    keys = get_services(request).keys
    key = bearer_token(request)
    if keys.enabled and key is None and token:
        return await keys.stream_caller(token, chain_id)
    return await keys.caller(key)


StreamCallerDep = Annotated[Caller, Depends(get_stream_caller)]


async def get_chains(request: Request) -> ChainService:
    return get_services(request).chains


Chains = Annotated[ChainService, Depends(get_chains)]


async def get_generation(request: Request) -> GenerationService:
    return get_services(request).generation


Generation = Annotated[GenerationService, Depends(get_generation)]


async def get_stems(request: Request) -> StemsService:
    return get_services(request).stems


StemsDep = Annotated[StemsService, Depends(get_stems)]


async def get_exports(request: Request) -> ExportService:
    return get_services(request).exports


Exports = Annotated[ExportService, Depends(get_exports)]


async def get_events(request: Request) -> EventsService:
    return get_services(request).events


Events = Annotated[EventsService, Depends(get_events)]


async def get_system(request: Request) -> SystemService:
    return get_services(request).system


System = Annotated[SystemService, Depends(get_system)]


async def get_health(request: Request) -> HealthService:
    return get_services(request).health


HealthDep = Annotated[HealthService, Depends(get_health)]


async def get_keys(request: Request) -> KeyService:
    return get_services(request).keys


Keys = Annotated[KeyService, Depends(get_keys)]


async def get_settings(request: Request) -> Settings:
    return get_services(request).settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
