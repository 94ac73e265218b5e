"""Real servers on 127.0.0.1 for tests that need a socket.

``running_server``: uvicorn in a thread. ``server_process``: ``sparrow serve`` in a child.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
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


@contextmanager
def server_process(
    data_dir: Path, port: int, *, log: Path | None = None, **extra_env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``sparrow serve`` in a child process, ready; killed when the block ends.

    Sparrow's variables come only from ``extra_env``; stderr goes to ``log`` if given.
    """
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SPARROW_") and k != "CF_MUSICGEN_MOCK"
        },
        "SPARROW_DATA_DIR": str(data_dir),
        "SPARROW_PORT": str(port),
        **extra_env,
    }
    with log.open("ab") if log is not None else open(os.devnull, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparrow", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                why = log.read_text() if log is not None else ""
                raise RuntimeError(f"sparrow serve did not become ready\n{why}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
