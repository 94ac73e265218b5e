"""One place that turns every failure into ``{"error", "detail"}``.

``SparrowError`` carries its own status and code. FastAPI's validation errors
become 422 ``invalid_input``; Starlette's routing errors (unknown path, wrong
method) keep their status with a code; anything unexpected is logged and
answered 500 ``internal`` without a trace.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparrow.api.routing import serves
from sparrow.api.schemas import ErrorOut
from sparrow.errors import (
    Overloaded,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RequestTimeout,
    SparrowError,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media",
    422: "invalid_input",
}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Invalid request — " + "; ".join(parts) + "."


async def _sparrow_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SparrowError)
    headers = None
    if isinstance(exc, Overloaded | Unavailable):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, RangeNotSatisfiable):
        headers = {"Content-Range": f"bytes */{exc.size}"}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, PayloadTooLarge | RequestTimeout):
        # The rest of the body will not be read: end the connection rather than drain it.
        headers = {"Connection": "close"}
    return error_response(exc.status_code, exc.code, exc.detail, headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_input", _describe_validation(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
    headers = dict(exc.headers or {})
    if exc.status_code == 400:
        # FastAPI's "error parsing the body" (bytes that are not UTF-8): as invalid JSON is.
        return error_response(422, "invalid_input", "The request body is not valid UTF-8 JSON.")
    if exc.status_code == 404 and detail == "Not Found":
        detail = "There is no such resource."
    if exc.status_code == 405:
        # Starlette names only the first route's methods; the path may have several routes.
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed here; use {', '.join(allowed)}."
    return error_response(exc.status_code, code, detail, headers or None)


def _allowed_methods(request: Request) -> list[str]:
    methods = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
    allowed = [m for m in methods if serves(request.app, request.scope, m)]
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.insert(allowed.index("GET") + 1, "HEAD")  # HeadMiddleware serves it
    return allowed


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "An internal error occurred; it has been logged.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SparrowError, _sparrow_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


_DESCRIPTIONS = {
    401: "Missing or invalid API key (only with SPARROW_AUTH=on).",
    402: "The key's tier does not include this feature.",
    404: "No such resource (or it belongs to another key).",
    408: "The request body stalled: nothing arrived for the idle timeout.",
    409: "The resource is not in a state that allows this.",
    413: "The upload or request is over a configured limit.",
    415: "The upload is not audio that FFmpeg can read.",
    416: "The requested byte range is outside the file.",
    422: "The request or the uploaded audio is invalid.",
    429: "Too busy; retry after `Retry-After` seconds.",
    503: "The server's own trouble: the database, the data dir or a stored file "
    "(`storage_unavailable`), or an engine or FFmpeg (`engine_unavailable`), cannot be used "
    "right now; retry after `Retry-After` seconds.",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can answer.

    Every API route can answer 401 (with auth on) and 422, 408 and 413 to a body that
    stalls or is too large (the body limit applies to every route, whatever it reads), and
    503 when the database or the data dir cannot be used.
    """
    return {
        status: {
            "model": ErrorOut,
            "description": _DESCRIPTIONS[status],
            **_HEADERS.get(status, {}),
        }
        for status in sorted({*statuses, 401, 408, 413, 422, 503})
    }


_RETRY_AFTER = {
    "headers": {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer"},
        }
    }
}
_HEADERS: dict[int, dict[str, Any]] = {429: _RETRY_AFTER, 503: _RETRY_AFTER}
