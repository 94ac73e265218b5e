"""Real servers for the HTTP benchmarks: uvicorn on 127.0.0.1, each in its own process.

    python -m bench.servers sparrow --port P --data-dir D [--stamp-events]
    python -m bench.servers bare --port P --bodies FILE

The benchmark's client runs in the parent process and the server in a child, so
the two do not share one interpreter lock. Both apps are served by the same
uvicorn settings (its default h11 protocol, no access log), so a comparison
between them is a comparison of the apps.

- ``sparrow``: ``create_app(Settings(data_dir=D, engine="mock"))`` with the mock
  engine at zero delay per step. ``--stamp-events`` records, for every event the
  hub publishes, the monotonic clock at that moment, and serves the record at
  ``GET /bench/published/{chain_id}`` as ``{event id: seconds}``; CLOCK_MONOTONIC
  is one clock for every process on the machine, so a client can subtract it
  from its own receipt times.
- ``bare``: a plain Starlette app that answers ``GET path`` with the JSON body
  stored for it in ``FILE`` (``{path: body}``), the smallest app that returns the
  same bytes as Sparrow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


# -- in the child -------------------------------------------------------------------


def bare_app(bodies: dict[str, Any]) -> Starlette:
    """A Starlette app answering each ``GET path`` with its stored JSON body."""

    def answer(body: Any) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            return JSONResponse(body)

        return endpoint

    return Starlette(routes=[Route(path, answer(body)) for path, body in bodies.items()])


def sparrow_app(data_dir: Path, *, stamp_events: bool) -> Starlette:
    """Sparrow as the server builds it, on the mock engine, with no delay per step."""
    from sparrow.api import create_app
    from sparrow.heap import own_heap
    from sparrow.settings import Settings

    own_heap()  # as sparrow serve does

    app = create_app(Settings(data_dir=data_dir, engine="mock", mock_step_ms=0))
    if stamp_events:
        published = _stamp_publish()

        async def stamps(request: Request) -> JSONResponse:
            return JSONResponse(published.get(request.path_params["chain_id"], {}))

        app.add_route("/bench/published/{chain_id}", stamps)
    return app


def _stamp_publish() -> dict[str, dict[int, float]]:
    """Wrap ``EventHub.publish`` to record when each event is handed to the subscribers."""
    from sparrow.events import EventHub, StoredEvent

    published: defaultdict[str, dict[int, float]] = defaultdict(dict)
    original = EventHub.publish

    def publish(self: EventHub, events: Sequence[StoredEvent]) -> None:
        now = time.monotonic()
        for event in events:
            published[event.chain_id][event.id] = now
        original(self, events)

    EventHub.publish = publish  # type: ignore[method-assign]
    return published


def _serve(app: Starlette, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=HOST,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


# -- in the parent ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve(kind: str, folder: Path, *args: str) -> Iterator[str]:
    """Run ``python -m bench.servers kind ARGS`` until the block ends; yields its base URL.

    Its output goes to a log file in ``folder``, shown if it fails to start.
    """
    port = free_port()
    log_path = folder / f"{kind}-{port}.log"
    argv = [sys.executable, "-m", "bench.servers", kind, "--port", str(port), *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}
        )
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(process, url, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the {url} server did not start:\n{tail}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sparrow", "bare"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--stamp-events", action="store_true")
    parser.add_argument("--bodies", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "sparrow":
        if args.data_dir is None:
            parser.error("sparrow needs --data-dir")
        _serve(sparrow_app(args.data_dir, stamp_events=args.stamp_events), args.port)
    else:
        if args.bodies is None:
            parser.error("bare needs --bodies")
        _serve(bare_app(json.loads(args.bodies.read_text())), args.port)


if __name__ == "__main__":
    main()
