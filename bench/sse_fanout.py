"""SSE fan-out: publish-to-receipt latency with 100 and 500 subscribers against 1, same run.

    python -m bench --only sse

A real Sparrow server (uvicorn, child process, mock engine) holds one chain per
audience size (1, 100, 500), each with a ready branch under its root. Every
subscriber streams ``GET /api/chains/{id}/events`` over its own raw asyncio
socket — a client light enough that 500 of them in one process measure the
server, not the client library. Events are made the way a musician makes them:
committing and uncommitting the branch in turn, each one ``spine-changed`` event.

Rounds interleave the chains — one event for 1 subscriber, one for 100, one for
500, again — and each publish waits until every subscriber has its event, so the
audiences never overlap. Latency is a subscriber's receipt (the monotonic clock
when its socket read returned the event) less the server's publish stamp (the
monotonic clock when the hub received the committed event; see
``bench.servers``): the hub's fan-out, each stream's serialization and send, the
loopback, and the client's turn to read. p50 and p99 are over every
(event, subscriber) pair; the 1-subscriber chain is the baseline.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench import servers
from bench.seed import analysed, create_chain, ready_branch, wav_bytes
from bench.table import Options, Row
from sparrow.heap import settle_heap

AUDIENCES = (1, 100, 500)
CONNECT_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Sizes:
    events: int  # per audience


QUICK = Sizes(events=10)
FULL = Sizes(events=60)


@dataclass(eq=False)
class Audience:
    """The subscribers of one chain, and when each received which event."""

    chain_id: str
    branch_id: str
    size: int
    received: list[dict[int, float]] = field(default_factory=list)
    connected: int = 0
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)
    complete: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    listeners: list[asyncio.Task[None]] = field(default_factory=list)
    _counts: Counter[int] = field(default_factory=Counter)

    def on_connected(self) -> None:
        self.connected += 1
        if self.connected == self.size:
            self.all_connected.set()

    def on_event(self, event_id: int) -> None:
        self._counts[event_id] += 1
        if self._counts[event_id] == self.size:
            self.complete.put_nowait(event_id)


async def subscribe(host: str, port: int, audience: Audience) -> asyncio.StreamWriter:
    """Open one event stream; a task records each event's receipt until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /api/chains/{audience.chain_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    received: dict[int, float] = {}
    audience.received.append(received)
    audience.listeners.append(asyncio.create_task(_listen(reader, audience, received)))
    return writer


async def all_connected(audience: Audience) -> None:
    """Wait until every subscriber is subscribed; a listener's failure is raised."""
    waiter = asyncio.ensure_future(audience.all_connected.wait())
    done, _ = await asyncio.wait(
        [waiter, *audience.listeners],
        timeout=CONNECT_TIMEOUT_S,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if waiter in done:
        return
    waiter.cancel()
    for task in done:
        task.result()
    raise TimeoutError(f"{audience.connected} of {audience.size} subscribers connected")


async def _listen(reader: asyncio.StreamReader, audience: Audience, got: dict[int, float]) -> None:
    status = await reader.readline()
    assert b" 200 " in status, status
    pending = b""
    while data := await reader.read(1 << 16):
        now = time.monotonic()
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            # Each event is one chunk of the chunked body: its lines arrive whole.
            if line.startswith(b"id: "):
                event_id = int(line[4:])
                got[event_id] = now
                audience.on_event(event_id)
            elif line.startswith(b": connected"):
                audience.on_connected()


async def publish(client: httpx.AsyncClient, audience: Audience, commit: bool) -> int:
    """Commit or uncommit the audience's branch; the event's id once all have it.

    The branch starts uncommitted: the first call must commit (an idle uncommit
    changes nothing and publishes nothing).
    """
    action = "commit" if commit else "uncommit"
    response = await client.post(f"/api/nodes/{audience.branch_id}/{action}")
    assert response.status_code == 200, response.text
    return await asyncio.wait_for(audience.complete.get(), EVENT_TIMEOUT_S)


def latencies(audience: Audience, event_ids: list[int], stamps: dict[int, float]) -> list[float]:
    """Seconds from publish to receipt, for every (event, subscriber) pair."""
    return [got[i] - stamps[i] for got in audience.received for i in event_ids]


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def measure(url: str, audiences: list[Audience], events: int) -> dict[int, list[float]]:
    """Publish-to-receipt seconds per audience size, events interleaved across audiences."""
    parts = urlsplit(url)
    host, port = parts.hostname or servers.HOST, parts.port or 80
    writers = []
    try:
        for audience in audiences:
            opened = [subscribe(host, port, audience) for _ in range(audience.size)]
            writers += await asyncio.gather(*opened)
        for audience in audiences:
            await all_connected(audience)
        # This process is the clients: its own collector pausing over its 500 sockets
        # would be counted as the server's latency.
        settle_heap()
        published: dict[int, list[int]] = {a.size: [] for a in audiences}
        async with httpx.AsyncClient(base_url=url, timeout=EVENT_TIMEOUT_S) as client:
            for n in range(events):
                for audience in audiences:
                    published[audience.size].append(await publish(client, audience, n % 2 == 0))
            out = {}
            for audience in audiences:
                stamps = (await client.get(f"/bench/published/{audience.chain_id}")).json()
                times = {int(k): float(v) for k, v in stamps.items()}
                out[audience.size] = latencies(audience, published[audience.size], times)
        return out
    finally:
        for writer in writers:
            writer.close()
        for audience in audiences:
            for task in audience.listeners:
                task.cancel()


def prepare(url: str, folder: Path) -> list[Audience]:
    """One chain per audience size, each with a ready branch under its root."""
    audiences = []
    with httpx.Client(base_url=url, timeout=EVENT_TIMEOUT_S) as client:
        for i, size in enumerate(AUDIENCES):
            created = create_chain(client, wav_bytes(folder, 1.0, seed=i))
            branch = ready_branch(client, created["root"]["id"])
            audiences.append(Audience(created["chain"]["id"], branch, size))
            analysed(client, [created["root"]["id"], branch])
    return audiences


def table_rows(options: Options) -> list[Row]:
    sizes = QUICK if options.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        args = ("--data-dir", str(folder / "data"), "--stamp-events")
        with servers.serve("sparrow", folder, *args) as url:
            audiences = prepare(url, folder)
            by_size = asyncio.run(measure(url, audiences, sizes.events))
    one = by_size[AUDIENCES[0]]
    rows = []
    for size in AUDIENCES[1:]:
        samples = by_size[size]
        rows += [
            Row(
                f"SSE publish→receipt p50, {size} subscribers vs 1",
                statistics.median(samples) * 1e3,
                statistics.median(one) * 1e3,
                "ms",
            ),
            Row(
                f"SSE publish→receipt p99, {size} subscribers vs 1",
                p99(samples) * 1e3,
                p99(one) * 1e3,
                "ms",
            ),
        ]
    return rows
