"""ASGI middleware that keeps HTTP semantics right around the routes.

- ``BodyLimitMiddleware``: JSON requests are small; a body over the limit is
  refused with 413 before it is read (``Content-Length``) or at the first byte
  past it (chunked). Uploads stream under their own, larger limit.
- ``HeadMiddleware``: ``HEAD`` works wherever ``GET`` does (RFC 9110): a route
  without its own HEAD handler runs as GET and the body is dropped.
- ``JSONCORSMiddleware``: Starlette's CORS, with its refusals rendered as the
  API's JSON errors.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparrow.api.errors import error_response
from sparrow.api.routing import serves
from sparrow.errors import PayloadTooLarge

JSON_BODY_LIMIT = 64 * 1024


def too_large_response(detail: str) -> JSONResponse:
    # Connection: close, so the server stops reading a body it has refused.
    return error_response(
        PayloadTooLarge.status_code, PayloadTooLarge.code, detail, {"Connection": "close"}
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit: int = JSON_BODY_LIMIT, exempt: set[str]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt  # "METHOD /path" of routes that enforce their own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or f"{scope['method']} {scope['path']}" in self.exempt:
            await self.app(scope, receive, send)
            return
        detail = f"The request body is larger than {self.limit // 1024} KiB."
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await too_large_response(detail)(scope, receive, send)
            return
        seen = 0
        cut_off = started = False

        async def counting_receive() -> Message:
            # Past the limit the app is told the client left; its answer is replaced below.
            nonlocal seen, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    cut_off = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut_off:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not cut_off:
                raise
        if cut_off and not started:
            await too_large_response(detail)(scope, receive, send)


class HeadMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "HEAD"
            or serves(scope["app"], scope, "HEAD")
        ):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class JSONCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode(errors="replace")
        headers = {
            k: v for k, v in response.headers.items() if k not in {"content-length", "content-type"}
        }
        detail = f"CORS preflight refused: {reason}."
        return error_response(response.status_code, "invalid_input", detail, headers)
