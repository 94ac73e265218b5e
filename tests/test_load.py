"""The event streams under load, over real sockets on 127.0.0.1 (SPEC §4).

Hundreds of subscribers on one chain while branches run; clients that stop
reading; connect/disconnect churn; a shutdown with streams open. The clients are
bare asyncio connections (HTTP/1.1, chunked) so that one test process holds
hundreds of them. Most servers run in a thread of the test process, so that the
hub, uvicorn's connections and the event loop's tasks can be looked at; latency is
then measured from the hub's publish to the client's receipt on one clock, and
includes the clients' own share of the interpreter. The bounds asserted are loose;
``pytest -s`` prints the measured numbers.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import statistics
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from helpers import SAMPLE, services, upload
from live import LiveServer, free_port, live_server, rss_mib, server_process
from sse_starlette.sse import AppStatus

import sparrow.api.events
from sparrow.events import EventHub, StoredEvent, Subscription
from sparrow.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
def _enough_file_descriptors() -> Iterator[None]:
    """Hundreds of clients and, in-thread, as many server sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def report(title: str, **numbers: Any) -> None:
    """The measured numbers, for ``pytest -s``."""
    shown = ", ".join(f"{k}={v}" for k, v in numbers.items())
    print(f"\n[load] {title}: {shown}")


# -- a light SSE client ------------------------------------------------------------------


@dataclass
class Received:
    at: float  # time.monotonic() when the chunk holding it arrived
    name: str
    id: int | None
    data: str


@dataclass
class Subscriber:
    """One stream on a bare connection; ``read()`` parses the chunks as they come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    events: list[Received] = field(default_factory=list)
    statuses: list[tuple[int | None, Any]] = field(default_factory=list)  # node-status: id, data
    seen: Counter[str] = field(default_factory=Counter)  # node-status events by status
    comments: list[str] = field(default_factory=list)
    ended: bool = False  # the response ended properly (its last chunk came)
    dropped: bool = False  # the connection closed before that
    _pending: bytes = b""

    @classmethod
    async def connect(
        cls, port: int, chain_id: str, *, last_event_id: str | None = None
    ) -> Subscriber:
        """Open the stream and read up to the ``connected`` comment (it is subscribed)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(chain_id, last_event_id))
        sub = cls(reader, writer)
        await sub.read_head()
        while not sub.comments and not sub.events and await sub.read_chunk():
            pass
        assert sub.comments[:1] == ["connected"], sub
        return sub

    async def read_head(self) -> None:
        status = await self.reader.readline()
        assert status.startswith(b"HTTP/1.1 200 "), status
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            assert not line.lower().startswith(b"content-length"), line

    async def read(self) -> None:
        """Until the response ends or the connection drops."""
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            while await self.read_chunk():
                pass
        self.dropped = self.dropped or not self.ended

    async def read_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not done() and await self.read_chunk():
                pass
        assert done(), self.events[-3:]

    async def read_chunk(self) -> bool:
        size_line = await self.reader.readline()
        if not size_line.endswith(b"\r\n"):
            self.dropped = True
            return False
        size = int(size_line, 16)
        chunk = await self.reader.readexactly(size + 2)
        if size == 0:
            self.ended = True
            return False
        self._pending += chunk[:-2]
        at = time.monotonic()
        while (end := self._pending.find(b"\r\n\r\n")) >= 0:
            block, self._pending = self._pending[:end].decode(), self._pending[end + 4 :]
            self._parse(block, at)
        return True

    def _parse(self, block: str, at: float) -> None:
        name, event_id, data = "message", None, None
        for line in block.split("\r\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "id":
                event_id = int(value)
            elif key == "data":
                data = value if data is None else f"{data}\n{value}"
        if data is not None:
            self.events.append(Received(at, name, event_id, data))
            if name == "node-status":
                self.statuses.append((event_id, json.loads(data)))
                self.seen[self.statuses[-1][1]["status"]] += 1

    async def close(self, *, reset: bool = False) -> None:
        await hang_up(self.writer, reset=reset)


async def hang_up(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    """Close the connection: a FIN, or with ``reset`` an RST."""
    if reset:
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    writer.close()
    with suppress(ConnectionError):
        await writer.wait_closed()


def request(chain_id: str, last_event_id: str | None = None) -> bytes:
    resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
    return (
        f"GET /api/chains/{chain_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Accept: text/event-stream\r\n{resume}\r\n"
    ).encode()


async def subscribe_many(port: int, chain_id: str, n: int) -> list[Subscriber]:
    subs: list[Subscriber] = []
    for start in range(0, n, 50):  # in waves: the listen backlog stays short
        wave = min(50, n - start)
        subs += await asyncio.gather(*(Subscriber.connect(port, chain_id) for _ in range(wave)))
    return subs


@asynccontextmanager
async def reading(
    subs: list[Subscriber], stalled: Sequence[socket.socket] = ()
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Every subscriber reads until the block ends; then all are closed (stalled ones too)."""
    tasks = [asyncio.create_task(s.read()) for s in subs]
    try:
        yield tasks
    finally:
        for sock in stalled:
            sock.close()
        for sub in subs:
            await sub.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """``work`` runs beside the block, and is cancelled when it ends."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def until(what: str, done: Callable[[], bool], timeout_s: float) -> float:
    """Wait for ``done()``; the seconds it took. Fails past the deadline."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def on_server(live: LiveServer, fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(live.call, fn)


# -- the server side ---------------------------------------------------------------------


@dataclass
class Published:
    """Every event the hub published, and when (the stream's latency starts there)."""

    events: list[StoredEvent] = field(default_factory=list)
    at: dict[int, float] = field(default_factory=dict)

    def finished(self) -> int:
        """How many nodes are done generating."""
        done = ("ready", "error", "cancelled")
        return sum(1 for e in self.events if e.name == "node-status" and e.data["status"] in done)

    def of(self, chain_id: str, name: str = "node-status") -> list[tuple[int | None, Any]]:
        return [(e.id, e.data) for e in self.events if e.chain_id == chain_id and e.name == name]


@dataclass
class Sample:
    at: float
    subscribers: int
    queued: list[int]  # each subscription's queue
    buffered: list[int]  # each connection's unsent bytes in uvicorn


def latest(samples: list[Sample]) -> Sample:
    return samples[-1] if samples else Sample(0, -1, [], [])


def record_publishing(monkeypatch: pytest.MonkeyPatch, hub: EventHub) -> Published:
    published = Published()
    original = hub.publish

    def publish(events: list[StoredEvent]) -> None:
        now = time.monotonic()
        for event in events:
            published.events.append(event)
            published.at[event.id] = now
        original(events)

    monkeypatch.setattr(hub, "publish", publish)
    return published


async def new_chain(http: httpx.AsyncClient) -> tuple[str, str]:
    response = await upload(http, SAMPLE)
    assert response.status_code == 201, response.text
    created = response.json()
    return created["chain"]["id"], created["root"]["id"]


async def branch(http: httpx.AsyncClient, parent_id: str, count: int, duration_s: float) -> int:
    body = {"count": count, "duration_s": duration_s, "context_s": 1.0}
    response = await http.post(f"/api/nodes/{parent_id}/branch", json=body)
    assert response.status_code == 202, response.text
    return len(response.json()["nodes"])


def event_ids(events: list[Received]) -> list[int]:
    ids = [e.id for e in events if e.id is not None]
    assert len(ids) == len(events), "an event without an id"
    return ids


def latencies_ms(subs: list[Subscriber], published: Published) -> list[float]:
    return [(e.at - published.at[e.id]) * 1000 for s in subs for e in s.events if e.id is not None]


def percentiles(values_ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values_ms, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49], 1),
        "p99_ms": round(cuts[98], 1),
        "max_ms": round(max(values_ms), 1),
    }


# -- the tests ---------------------------------------------------------------------------

SUBSCRIBERS, BRANCHES = 300, 2


async def test_hundreds_of_subscribers_get_every_status_in_order_and_promptly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="mock", mock_step_ms=2)
    with live_server(settings) as live:
        hub = services(live.app).hub
        published = record_publishing(monkeypatch, hub)
        async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
            chain_id, root_id = await new_chain(http)
            started = time.monotonic()
            subs = await subscribe_many(live.port, chain_id, SUBSCRIBERS)
            connect_s = time.monotonic() - started
            assert await on_server(live, lambda: hub.subscriber_count(chain_id)) == SUBSCRIBERS
            async with reading(subs):
                nodes = 0
                for _ in range(BRANCHES):
                    nodes += await branch(http, root_id, count=4, duration_s=1.0)
                took = await until(
                    "every subscriber to see every node ready",
                    lambda: all(s.seen["ready"] == nodes for s in subs),
                    timeout_s=40,
                )
    expected = published.of(chain_id)
    assert len(expected) == 3 * nodes  # queued, generating, ready
    for sub in subs:
        assert sub.statuses == expected  # every status, in order, with the same ids
        ids = event_ids(sub.events)
        assert ids == sorted(set(ids))
    progress = [sum(e.name == "node-progress" for e in s.events) for s in subs]
    total = len([e for e in published.events if e.chain_id == chain_id])
    latency = percentiles(latencies_ms(subs, published))
    report(
        f"{SUBSCRIBERS} subscribers, one chain, {BRANCHES} branches of 4",
        connect_s=round(connect_s, 2),
        events=total,
        delivered=sum(len(s.events) for s in subs),
        progress_per_subscriber=f"{min(progress)}..{max(progress)}",
        run_s=round(took, 2),
        **latency,
    )
    assert latency["p50_ms"] < 500 and latency["p99_ms"] < 3000


STALLED, HEALTHY, QUEUE_LIMIT = 12, 24, 32
SNDBUF = 4096  # the kernel doubles it: 8 KiB per server socket, not megabytes
# A stalled connection holds at most uvicorn's write buffer (it stops writing past
# 64 KiB) plus one chunk; chunks here are well under a kilobyte.
MAX_WRITE_BUFFER = 64 * 1024 + 1024


async def stalled_streams(port: int, chain_id: str, n: int) -> list[socket.socket]:
    """Clients that send their request, then never read, with a tiny receive window."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    with closing(socks, unless_ok=True):
        for _ in range(n):
            socks.append(sock := socket.socket())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, request(chain_id))
    return socks


@contextmanager
def closing(socks: list[socket.socket], *, unless_ok: bool = False) -> Iterator[None]:
    """Close the sockets when the block ends (``unless_ok``: only if it fails)."""
    try:
        yield
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not unless_ok:
        for sock in socks:
            sock.close()


def write_buffers(live: LiveServer) -> list[int]:
    """What uvicorn holds, unsent, for each open connection."""
    return [c.transport.get_write_buffer_size() for c in live.server.server_state.connections]


def record_cut_offs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each subscription overflowed and was cut off."""
    times: list[float] = []
    offer = Subscription.offer

    def recording(self: Subscription, event: StoredEvent) -> None:
        was = self.cut_off
        offer(self, event)
        if self.cut_off and not was:
            times.append(time.monotonic())

    monkeypatch.setattr(Subscription, "offer", recording)
    return times


async def keep_generating(
    http: httpx.AsyncClient, root_id: str, published: Published, stop: Callable[[], bool]
) -> int:
    """Branch after branch, a job always waiting, until ``stop()``; the nodes made."""
    nodes, started, finished_before = 0, time.monotonic(), published.finished()
    while not stop():
        assert time.monotonic() - started < 30, "timed out generating"
        if published.finished() - finished_before >= nodes - 8:
            nodes += await branch(http, root_id, count=8, duration_s=1.0)
        await asyncio.sleep(0.05)
    return nodes


async def test_stalled_subscribers_are_cut_off_promptly_and_the_rest_are_unaffected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", engine="mock", mock_step_ms=1, sse_queue_limit=QUEUE_LIMIT
    )
    cut_offs = record_cut_offs(monkeypatch)
    with live_server(settings, sndbuf=SNDBUF) as live:
        hub = services(live.app).hub
        published = record_publishing(monkeypatch, hub)
        async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
            chain_id, root_id = await new_chain(http)
            stalled = await stalled_streams(live.port, chain_id, STALLED)
            healthy = await subscribe_many(live.port, chain_id, HEALTHY)
            everyone = STALLED + HEALTHY
            await until(
                "every stream to subscribe",
                lambda: live.call(lambda: hub.subscriber_count(chain_id)) == everyone,
                timeout_s=10,
            )
            rss_before = rss_mib()
            samples: list[Sample] = []

            def sample() -> Sample:
                return Sample(
                    time.monotonic(),
                    hub.subscriber_count(chain_id),
                    hub.queued(chain_id),
                    write_buffers(live),
                )

            async def watch() -> None:
                while True:
                    samples.append(await on_server(live, sample))
                    await asyncio.sleep(0.05)

            async with reading(healthy, stalled), background(watch()):
                started = time.monotonic()
                nodes = await keep_generating(
                    http, root_id, published, lambda: latest(samples).subscribers == HEALTHY
                )
                gone = latest(samples)
                events_until_gone = len(published.events)
                # A job more: what the server holds for the stalled clients
                # does not grow.
                nodes += await keep_generating(
                    http,
                    root_id,
                    published,
                    lambda: len(published.events) > events_until_gone + 160,
                )
                await until(
                    "healthy subscribers to see every node ready",
                    lambda: all(s.seen["ready"] == nodes for s in healthy),
                    timeout_s=30,
                )
                after = latest(samples)
                rss_growth = rss_mib() - rss_before
                # A stalled client that reads again gets what was buffered, then the end;
                # it resumes from its last event's id and misses nothing.
                expected = published.of(chain_id)
                recovered = await asyncio.gather(
                    *(recover(live.port, chain_id, sock, published) for sock in stalled)
                )
    for sub in healthy:
        assert sub.statuses == expected  # unaffected: every status, in order
    for before_cut, replayed in recovered:
        assert before_cut + replayed == expected
    assert len(cut_offs) == STALLED  # only the stalled ones overflowed
    cut_to_gone = gone.at - max(cut_offs)
    peak_queue = max(max(s.queued, default=0) for s in samples)
    peak_buffer = max(max(s.buffered, default=0) for s in samples)
    held_at_gone, held_after = sum(gone.buffered), sum(after.buffered)
    latency = percentiles(latencies_ms(healthy, published))
    report(
        f"{STALLED} stalled + {HEALTHY} healthy subscribers, queue limit {QUEUE_LIMIT}",
        stalled_gone_after_s=round(gone.at - started, 2),
        events_until_gone=events_until_gone,
        overflow_to_disconnect_s=round(cut_to_gone, 2),
        events=len(published.events),
        peak_queue=peak_queue,
        peak_write_buffer_kib=round(peak_buffer / 1024, 1),
        held_kib_at_cut=round(held_at_gone / 1024, 1),
        held_kib_160_events_later=round(held_after / 1024, 1),
        rss_growth_mib=round(rss_growth, 1),
        **latency,
    )
    assert cut_to_gone < 5  # not SEND_TIMEOUT_S later
    assert peak_queue <= QUEUE_LIMIT and peak_buffer <= MAX_WRITE_BUFFER
    assert held_after <= held_at_gone + HEALTHY * 1024  # healthy ones may hold a chunk each
    assert rss_growth < 100
    assert latency["p99_ms"] < 3000


async def recover(
    port: int, chain_id: str, sock: socket.socket, published: Published
) -> tuple[list[tuple[int | None, Any]], list[tuple[int | None, Any]]]:
    """A stalled client reads again: what it got before the cut, and the replay after it."""
    reader, writer = await asyncio.open_connection(sock=sock)
    late = Subscriber(reader, writer)
    await late.read_head()
    await asyncio.wait_for(late.read(), 10)
    await late.close()
    assert late.dropped and late.events  # cut off mid-stream, not ended
    last_id = published.events[-1].id
    again = await Subscriber.connect(port, chain_id, last_event_id=str(late.events[-1].id))
    await again.read_until(lambda: again.events[-1:] != [] and again.events[-1].id == last_id, 10)
    await again.close()
    return late.statuses, again.statuses


@asynccontextmanager
async def stalled_by_pings(
    tmp_path: Path, *, limit_s: float = 10
) -> AsyncIterator[tuple[LiveServer, str, socket.socket]]:
    """A server whose one stream is stuck on a client that takes no bytes.

    Keepalive comments every half millisecond fill the buffers within a second or two, with no
    events at all.
    """
    settings = Settings(data_dir=tmp_path / "data", engine="mock", sse_keepalive_s=0.0005)
    with live_server(settings, sndbuf=SNDBUF) as live:
        async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
            chain_id, _ = await new_chain(http)
        [sock] = await stalled_streams(live.port, chain_id, 1)
        with closing([sock]):
            await until(
                "the stream's writes to block",
                lambda: max(live.call(lambda: write_buffers(live)), default=0) > 64 * 1024,
                timeout_s=limit_s,
            )
            yield live, chain_id, sock


async def test_a_client_that_takes_no_bytes_and_gets_no_events_is_cut_off_by_the_send_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparrow.api.events, "SEND_TIMEOUT_S", 1.0)  # 30 s in production
    async with stalled_by_pings(tmp_path) as (live, chain_id, _):
        hub = services(live.app).hub
        assert await on_server(live, lambda: hub.subscriber_count(chain_id)) == 1
        gone_s = await until(
            "the stuck stream to end",
            lambda: live.call(lambda: hub.subscriber_count(chain_id)) == 0,
            timeout_s=5,
        )
        held = await on_server(live, lambda: write_buffers(live))
    report("a stalled stream with only keepalives", cut_after_s=round(gone_s, 2), held=held)
    assert max(held) <= MAX_WRITE_BUFFER


async def test_shutdown_is_prompt_even_with_a_client_that_takes_no_bytes(
    tmp_path: Path,
) -> None:
    async with stalled_by_pings(tmp_path) as (live, _, sock):
        started = time.monotonic()
        AppStatus.should_exit = live.server.should_exit = True
        with suppress(AssertionError):
            await until("the server to stop", live.loop.is_closed, timeout_s=2.5)
        shutdown_s = time.monotonic() - started
        sock.close()  # lets a stuck shutdown finish
        await until("the server to stop", live.loop.is_closed, timeout_s=10)
    report("shutdown with a stalled stream", stopped_after_s=round(shutdown_s, 2))
    assert shutdown_s < 2.5


CYCLES, AT_ONCE = 200, 25


async def one_cycle(port: int, chain_id: str, kind: int) -> None:
    """Connect and leave, one of four ways."""
    if kind == 0:  # connect and wait for nothing, then reset: maybe before the route ran
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(chain_id))
        await writer.drain()
        await hang_up(writer, reset=True)
        return
    sub = await Subscriber.connect(port, chain_id, last_event_id="0" if kind == 3 else None)
    if kind == 3:  # mid-replay of the whole log
        await sub.read_until(lambda: len(sub.events) >= 5, 10)
    await sub.close(reset=kind != 1)  # 1: a polite FIN; 2 and 3: a reset


async def test_connect_disconnect_cycles_leave_no_subscribers_tasks_or_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="mock", mock_step_ms=2)
    with live_server(settings) as live:
        hub = services(live.app).hub
        published = record_publishing(monkeypatch, hub)
        state = live.server.server_state

        def tasks() -> set[asyncio.Task[Any]]:
            return asyncio.all_tasks() - {asyncio.current_task()}

        async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
            chain_id, root_id = await new_chain(http)
            first = await Subscriber.connect(live.port, chain_id)  # starts sse-starlette's watcher
            await first.close()
        await until("a quiet server", lambda: live.call(lambda: not state.connections), 10)
        before = await on_server(live, tasks)
        counts: list[int] = []

        async def watch() -> None:
            while True:
                counts.append(await on_server(live, hub.subscriber_count))
                await asyncio.sleep(0.01)

        async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
            nodes = await branch(http, root_id, count=4, duration_s=3.0)  # events flow meanwhile
            started = time.monotonic()
            async with background(watch()):
                for wave in range(0, CYCLES, AT_ONCE):
                    cycles = (
                        one_cycle(live.port, chain_id, i % 4) for i in range(wave, wave + AT_ONCE)
                    )
                    await asyncio.gather(*cycles)
            cycles_s = time.monotonic() - started
            await until("the branch to finish", lambda: published.finished() == nodes, 30)
        settle_s = await until(
            "no subscribers, connections or new tasks",
            lambda: (
                live.call(
                    lambda: (hub.subscriber_count(), len(state.connections), tasks() - before)
                )
                == (0, 0, set())
            ),
            timeout_s=10,
        )
        left = await on_server(live, lambda: len(tasks() - before))
    report(
        f"{CYCLES} connect/disconnect cycles, {AT_ONCE} at once",
        cycles_s=round(cycles_s, 2),
        peak_subscribers=max(counts),
        settled_in_s=round(settle_s, 2),
        tasks_before=len(before),
        tasks_left_over=left,
    )


OPEN_AT_SHUTDOWN = 100


async def test_shutdown_with_open_streams_is_prompt_and_each_stream_ends_cleanly(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {"SPARROW_ENGINE": "mock", "SPARROW_MOCK_STEP_MS": "5"}
    with server_process(tmp_path / "data", port, log=tmp_path / "serve.log", **env) as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            chain_id, root_id = await new_chain(http)
            subs = await subscribe_many(port, chain_id, OPEN_AT_SHUTDOWN)
            async with reading(subs) as readers:
                await branch(http, root_id, count=2, duration_s=20)  # running at shutdown
                await until(
                    "every stream to see progress",
                    lambda: all(any(e.name == "node-progress" for e in s.events) for s in subs),
                    timeout_s=20,
                )
                rss = rss_mib(proc.pid)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                streams_ended_s = await until(
                    "every stream to end", lambda: all(r.done() for r in readers), timeout_s=10
                )
                await asyncio.to_thread(proc.wait, 10)
                exited_s = time.monotonic() - started
    report(
        f"SIGTERM with {OPEN_AT_SHUTDOWN} open streams, a job running",
        server_rss_mib=round(rss, 1),
        streams_ended_s=round(streams_ended_s, 2),
        exited_s=round(exited_s, 2),
        exit_code=proc.returncode,
    )
    for sub in subs:
        assert sub.ended and not sub.dropped  # the response ended properly
        last = sub.events[-1]
        assert (last.name, last.id) == ("shutdown", None)  # the client's position is kept
        ids = event_ids(sub.events[:-1])
        assert ids == sorted(set(ids))
    # uvicorn re-raises the signal once it has shut down gracefully
    assert proc.returncode == -signal.SIGTERM
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    assert exited_s < 5
