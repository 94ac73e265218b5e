"""Real servers on 127.0.0.1 for tests that need a socket.

``running_server``: uvicorn in a thread (``live_server``: the same, with its app and
event loop at hand). ``server_process``: ``sparrow serve`` in a child.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from sparrow.api import create_app
from sparrow.api.serving import server_config
from sparrow.settings import Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """A server running in a thread, and what a test may look at inside it."""

    base: str
    port: int
    app: FastAPI
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Callable[[], T], *, timeout_s: float = 10) -> T:
        """``fn()`` run on the server's event loop, where its state may be read safely."""

        async def on_the_loop() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_the_loop(), self.loop).result(timeout_s)


@contextmanager
def live_server(
    settings: Settings, *, timeout_s: float = 20, sndbuf: int | None = None
) -> Iterator[LiveServer]:
    """Serve ``create_app(settings)`` in a thread until the block ends.

    ``sndbuf``: the kernel send buffer of every accepted socket (they inherit the
    listening socket's), so that a client that stops reading blocks the server's
    writes after kilobytes rather than megabytes.
    """
    listener = socket.socket()
    if sndbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port: int = listener.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            listener.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        loop = server.servers[0].get_loop()
        yield LiveServer(f"http://127.0.0.1:{port}", port, app, server, loop)
    finally:
        # sse-starlette ends its streams on a process-wide flag (uvicorn's signal
        # handler sets it in a real server); set it, then reset it for the next test.
        AppStatus.should_exit = True
        server.should_exit = True
        thread.join(timeout_s)
        AppStatus.should_exit = False


@contextmanager
def running_server(settings: Settings, *, timeout_s: float = 20) -> Iterator[str]:
    """Serve ``create_app(settings)`` until the block ends; yields the base URL."""
    with live_server(settings, timeout_s=timeout_s) as live:
        yield live.base


def sparrow_env(**sparrow: str) -> dict[str, str]:
    """This process's environment for a child Sparrow, with no Sparrow variable of the
    developer's in it: only ``sparrow``'s."""
    mine = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SPARROW_") and k != "CF_MUSICGEN_MOCK"
    }
    return {**mine, **sparrow}


@contextmanager
def server_process(
    data_dir: Path,
    port: int,
    *,
    log: Path | None = None,
    wait_for: str = "/readyz",
    **extra_env: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``sparrow serve`` in a child process, ready; killed when the block ends.

    Sparrow's variables come only from ``extra_env``; stderr goes to ``log`` if given.
    Ready means ``wait_for`` answers 200 (``/healthz``: merely up).
    """
    where = {"SPARROW_DATA_DIR": str(data_dir), "SPARROW_PORT": str(port)}
    env = sparrow_env(**{**where, **extra_env})  # ``extra_env`` wins, as it always did
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
                if httpx.get(f"http://127.0.0.1:{port}{wait_for}", timeout=1).status_code == 200:
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


def sparrow_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sparrow ARGS`` on ``data_dir`` (e.g. ``keys create``) and return what it printed."""
    env = {**os.environ, "SPARROW_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "sparrow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def read_status(sock: socket.socket, timeout_s: float) -> int:
    """The status code of the answer arriving on ``sock`` (its first line is enough)."""
    sock.settimeout(timeout_s)
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
