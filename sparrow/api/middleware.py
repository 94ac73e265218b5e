"""ASGI middleware that keeps HTTP semantics right around the routes.

- ``BodyLimitMiddleware``: JSON requests are small; a body over the limit is
  refused with 413 before it is read (``Content-Length``) or at the first byte
  past it (chunked), and a body that stops arriving (a ``Content-Length`` that
  lies, a stalled client) with 408 after the idle timeout. Uploads stream under
  their own, larger limit and the same timeout.
- ``HeadMiddleware``: ``HEAD`` works wherever ``GET`` does (RFC 9110): a route
  without its own HEAD handler runs as GET and the body is dropped.
- ``JSONCORSMiddleware``: Starlette's CORS, with its refusals rendered as the
  API's JSON errors.
"""

from __future__ import annotations

import anyio
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparrow.api.errors import error_response
from sparrow.api.routing import serves
from sparrow.errors import PayloadTooLarge, RequestTimeout

JSON_BODY_LIMIT = 64 * 1024


def _closing(error: PayloadTooLarge | RequestTimeout) -> JSONResponse:
    # Connection: close, so the server stops reading a body it has refused.
    return error_response(error.status_code, error.code, error.detail, {"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int = JSON_BODY_LIMIT,
        idle_timeout_s: float,
        exempt: set[str],
    ) -> None:
        self.app = app
        self.limit = limit
        self.idle_timeout_s = idle_timeout_s
        self.exempt = exempt  # "METHOD /path" of routes that enforce their own limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or f"{scope['method']} {scope['path']}" in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared in ("", "0") and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body: nothing to count or wait for
            return
        detail = f"The request body is larger than {self.limit // 1024} KiB."
        if declared.isdigit() and int(declared) > self.limit:
            await _closing(PayloadTooLarge(detail))(scope, receive, send)
            return
        seen = 0
        refused: PayloadTooLarge | RequestTimeout | None = None
        started = body_done = False

        async def counting_receive() -> Message:
            # Refused, the app is told the client left; its answer is replaced below.
            nonlocal seen, refused, body_done
            if refused is not None:
                return {"type": "http.disconnect"}
            if body_done:  # what follows the body is only a disconnect: no time limit
                return await receive()
            with anyio.move_on_after(self.idle_timeout_s):
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if seen > self.limit:
                        refused = PayloadTooLarge(detail)
                        return {"type": "http.disconnect"}
                return message
            refused = RequestTimeout(
                f"The request body stalled: nothing arrived for {self.idle_timeout_s:g} s."
            )
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await _closing(refused)(scope, receive, send)


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
