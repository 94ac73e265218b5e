"""The API's routers, the JSON answer of its hot reads, and asking the app's router which
methods a path answers.

Each module of routes builds its router with ``api_router``: the routes carry their
full path (``/api/…``) and their operation id from the start, so that the app takes
them into its own router as they are (``FastAPI(routes=…)``). Included with
``include_router``, each router would be a node that FastAPI's routing walks for
every request, matching each of its routes twice, with bookkeeping around every
try (docs/performance.md measures it).

The small reads a client polls (a node, a chain, the list, the spine) answer with
``ModelJSON``: their schema is built from the domain objects, and so already
validated, and pydantic serialises it once. Returned as a model, FastAPI would
validate it against the route's response model a second time and serialise it
through its own adapter, a tenth of such a read's time. The routes keep their
``response_model`` for the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

API_PREFIX = "/api"


def operation_id(route: APIRoute) -> str:
    """Operation ids are the route functions' names: stable, and readable in clients."""
    return route.name


def api_router(tag: str, *, prefix: str = API_PREFIX) -> APIRouter:
    """The router of one module of routes, under ``prefix``, documented under ``tag``."""
    return APIRouter(prefix=prefix, tags=[tag], generate_unique_id_function=operation_id)


class ModelJSON(Response):
    """A schema's JSON, serialised by pydantic, as the route's response model has it."""

    media_type = "application/json"

    def __init__(self, model: BaseModel) -> None:
        super().__init__(model.model_dump_json())


def serves(app: Any, scope: Scope, method: str) -> bool:
    """Whether some route of ``app`` fully matches ``scope``'s path with ``method``."""
    scope = {**scope, "method": method}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)
