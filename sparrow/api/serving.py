"""How Sparrow runs under uvicorn: one ``Config`` for ``sparrow serve`` and the tests.

At shutdown uvicorn asks every connection to close and waits for them (up to
its graceful timeout), but closing a transport waits for its unsent bytes to
drain: a client that takes no bytes — a stalled event stream, a download that
stopped reading — would hold the shutdown for the whole timeout.
``PromptShutdownProtocol`` aborts a connection still open ``ABORT_AFTER_S``
after shutdown began, so streams end promptly whatever their clients do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

ABORT_AFTER_S = 1.0
GRACEFUL_SHUTDOWN_S = 10


class PromptShutdownProtocol(H11Protocol):
    def shutdown(self) -> None:
        super().shutdown()
        asyncio.get_running_loop().call_later(ABORT_AFTER_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self in self.connections:  # connection_lost has not run: bytes are stuck
            self.transport.abort()


def server_config(app: Any, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=PromptShutdownProtocol,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **options,
    )
