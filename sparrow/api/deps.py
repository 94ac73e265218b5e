"""FastAPI dependencies: the way routes reach the services the lifespan built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from sparrow.domain.chains import ChainService
from sparrow.domain.generation import GenerationService

if TYPE_CHECKING:
    from sparrow.api.app import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_chains(request: Request) -> ChainService:
    return get_services(request).chains


Chains = Annotated[ChainService, Depends(get_chains)]


def get_generation(request: Request) -> GenerationService:
    return get_services(request).generation


Generation = Annotated[GenerationService, Depends(get_generation)]
