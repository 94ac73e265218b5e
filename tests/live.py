"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need a socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from sse_starlette.sse import AppStatus

from sparrow.api import create_app
from sparrow.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running_server(settings: Settings, *, timeout_s: float = 20) -> Iterator[str]:
    """Serve ``create_app(settings)`` until the block ends; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # sse-starlette ends its streams on a process-wide flag (uvicorn's signal
        # handler sets it in a real server); set it, then reset it for the next test.
        AppStatus.should_exit = True
        server.should_exit = True
        thread.join(timeout_s)
        AppStatus.should_exit = False
