"""The OpenAPI document as this server's settings make it.

FastAPI builds the document from the routes; two things in it depend on the settings:

- the branch limits (``SPARROW_MAX_BRANCH_S``, ``SPARROW_MAX_COUNT``) become the
  schema's maxima, so a request the document calls valid is one the server takes;
- with auth on every /api operation lists the bearer scheme (``sparrow.api.deps``
  reads the key itself, so FastAPI does not see the scheme); with auth off none does.

It also describes the event stream event by event (FastAPI knows it only as a
string): an event's name, its integer id, and its JSON data's schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from sparrow.api.routing import API_PREFIX
from sparrow.api.schemas import EVENT_DATA
from sparrow.settings import Settings

EVENTS_PATH = "/api/chains/{chain_id}/events"
BEARER = "HTTPBearer"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key from `sparrow keys create`; needed when the server runs with "
    "SPARROW_AUTH=on.",
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            tailor(build(), settings)  # build() keeps the document on the app; changed in place
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def tailor(doc: dict[str, Any], settings: Settings) -> None:
    branch = doc["components"]["schemas"]["BranchIn"]["properties"]
    branch["duration_s"]["maximum"] = settings.max_branch_s
    branch["count"]["maximum"] = settings.max_count
    _describe_events(doc)
    if settings.auth == "on":
        doc["components"]["securitySchemes"] = {BEARER: BEARER_SCHEME}
        for path, operations in doc["paths"].items():
            if path.startswith(API_PREFIX + "/"):
                for operation in operations.values():
                    operation["security"] = [{BEARER: []}]


def _describe_events(doc: dict[str, Any]) -> None:
    models = sorted(set(EVENT_DATA.values()), key=lambda m: m.__name__)
    _, defs = models_json_schema(
        [(m, "serialization") for m in models], ref_template="#/components/schemas/{model}"
    )
    doc["components"]["schemas"].update(defs["$defs"])
    events = [
        {
            "type": "object",
            "required": ["event", "data"] if name == "shutdown" else ["event", "id", "data"],
            "properties": {
                "event": {"const": name},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "retry": {"type": "integer"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"},
                },
            },
        }
        for name, model in EVENT_DATA.items()
    ]
    stream = doc["paths"][EVENTS_PATH]["get"]["responses"]["200"]["content"]
    stream["text/event-stream"] = {"schema": {"description": "One event.", "oneOf": events}}
