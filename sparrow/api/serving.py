"""How Sparrow runs under uvicorn: one ``Config`` for ``sparrow serve`` and the tests.

At shutdown uvicorn asks every connection to close and waits for them (up to
its graceful timeout), but closing a transport waits for its unsent bytes to
drain: a client that takes no bytes — a stalled event stream, a download that
stopped reading — would hold the shutdown for the whole timeout.
``PromptShutdownProtocol`` aborts a connection still open ``ABORT_AFTER_S``
after shutdown began, so streams end promptly whatever their clients do.

A request that h11 cannot parse never reaches the app, and uvicorn answers it
with a plain-text 400. The protocol answers it as the API answers every error,
``{"error", "detail"}``: 431 when the request's head is over h11's limit (16 KiB:
a 10,000-ETag ``If-None-Match``, a 1 MB ``Last-Event-ID``), else 400.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

ABORT_AFTER_S = 1.0
DISCARD_S = 1.0  # after refusing a request, how long its rest is read and dropped
GRACEFUL_SHUTDOWN_S = 10


class PromptShutdownProtocol(H11Protocol):
    _discarding = False

    def data_received(self, data: bytes) -> None:
        if not self._discarding:
            super().data_received(data)

    def shutdown(self) -> None:
        super().shutdown()
        asyncio.get_running_loop().call_later(ABORT_AFTER_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self in self.connections:  # connection_lost has not run: bytes are stuck
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        pending, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        too_large = len(pending) > limit
        if too_large:
            status, code = 431, "headers_too_large"
            detail = "The request's headers are larger than the server accepts (16 KiB)."
        else:
            status, code = 400, "invalid_input"
            detail = "The request is not valid HTTP/1.1."
        body = json.dumps({"error": code, "detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        # h11's state may be past a response it can send; write the bytes as they are.
        reason = b"Request Header Fields Too Large" if too_large else b"Bad Request"
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        head += b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        self.transport.write(head + b"\r\n" + body)
        # Closing with the rest of the request unread would reset the connection, and the
        # client could lose the answer: end our side, drop what still arrives, then close.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(DISCARD_S, self.transport.close)


def server_config(app: Any, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=PromptShutdownProtocol,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **options,
    )
