"""The cluster on PostgreSQL: throughput by workers, events across replicas, the spine's CTE.

    python -m bench --only cluster

A PostgreSQL server of the benchmark's own (Debian's binaries, 127.0.0.1, see
``sparrow.store.local_postgres``) and real processes: ``sparrow serve`` replicas and
``sparrow worker`` processes with the mock engine, sharing a data dir.

- **Jobs per minute with 1, 2 and 4 workers**, each against 1 worker: a fresh
  database, one replica, N workers; J one-second branches (the mock sleeps
  ``MOCK_STEP_MS`` per 20 ms frame, as a GPU would be busy) sent at once over four
  chains, timed until every node is ready.
- **Event latency across replicas**: two replicas, a subscriber on each; the
  branch's commit and uncommit in turn through replica A, one ``spine-changed``
  event each. Latency is from sending the request to the event's arrival: on
  replica B (the measurement) against replica A (the baseline, the writing
  replica). Both go through PostgreSQL's NOTIFY and the log, so the ratio shows
  what another replica costs.
- **The spine's CTE on PostgreSQL against SQLite** at depth 1,000 and 10,000: the
  same chain built in each, the spine read as ``Node``s, medians of interleaved
  reads.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx

from bench.seed import create_chain, ready_branch, wav_bytes
from bench.spine_depth import build
from bench.table import Options, Row, progress
from bench.timing import interleaved
from sparrow.events import EventHub
from sparrow.store import ChainStore, Database
from sparrow.store.local_postgres import LocalPostgres, free_port, local_postgres
from sparrow.store.postgres import PostgresDatabase
from sparrow.store.sqlite import SqliteDatabase

MOCK_STEP_MS = "20"  # a 1 s branch: 50 frames, 1 s of a worker's time
START_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 300.0


@contextmanager
def processes(url: str, data_dir: Path, *, replicas: int, workers: int) -> Iterator[list[str]]:
    """``replicas`` servers and ``workers`` workers on one database; the servers' URLs."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SPARROW_")},
        "SPARROW_DATABASE_URL": url,
        "SPARROW_DATA_DIR": str(data_dir),
        "SPARROW_ENGINE": "mock",
        "SPARROW_MOCK_STEP_MS": MOCK_STEP_MS,
        "SPARROW_QUEUE_LIMIT": "1000",
    }
    started: list[subprocess.Popen[bytes]] = []

    def spawn(command: str, **extra: str) -> None:
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "sparrow", command],
                env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    bases = []
    try:
        for _ in range(replicas):
            port = free_port()
            spawn("serve", SPARROW_PORT=str(port))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            _wait(partial(_answers, f"{base}/readyz"))
        for _ in range(workers):
            spawn("worker")
        _wait(partial(_lists_workers, f"{bases[0]}/api/gpu", workers))
        yield bases
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _answers(url: str) -> bool:
    return httpx.get(url, timeout=1).status_code == 200


def _lists_workers(url: str, workers: int) -> bool:
    return len(httpx.get(url, timeout=2).json()["workers"]) == workers


def _wait(check: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not start")
        time.sleep(0.05)


def jobs_per_minute(pg: LocalPostgres, workers: int, jobs: int, tmp: Path) -> float:
    data_dir = tmp / f"throughput-{workers}"
    with processes(pg.new_database(), data_dir, replicas=1, workers=workers) as (base,):
        client = httpx.Client(base_url=base, timeout=30)
        clip = wav_bytes(tmp, 2.0)
        roots = [create_chain(client, clip)["root"]["id"] for _ in range(4)]
        started = time.monotonic()
        node_ids = []
        for i in range(jobs):
            response = client.post(
                f"/api/nodes/{roots[i % 4]}/branch",
                json={"prompt": "bench", "duration_s": 1.0, "count": 1},
            )
            assert response.status_code == 202, response.text
            node_ids.append(response.json()["nodes"][0]["id"])
        waiting = set(node_ids)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} jobs never finished")
            for node_id in list(waiting):
                status = client.get(f"/api/nodes/{node_id}").json()["status"]
                assert status in ("queued", "generating", "ready"), status
                if status == "ready":
                    waiting.discard(node_id)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        client.close()
    return jobs / elapsed * 60


class Subscriber(threading.Thread):
    """Reads one chain's stream and stamps each event's arrival (monotonic clock)."""

    def __init__(self, base: str, chain_id: str, after: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{base}/api/chains/{chain_id}/events"
        self.after = after
        self.arrivals: dict[int, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        headers = {"Last-Event-ID": str(self.after)}
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=60)) as client,
            client.stream("GET", self.url, headers=headers) as response,
        ):
            self.ready.set()
            for line in response.iter_lines():
                if line.startswith("id:"):
                    self.arrivals[int(line[3:].strip())] = time.monotonic()


def event_latency(pg: LocalPostgres, events: int, tmp: Path) -> tuple[list[float], list[float]]:
    """Seconds from the request to the event's arrival: on the writing replica, on the other."""
    with processes(pg.new_database(), tmp / "events", replicas=2, workers=1) as (a, b):
        client = httpx.Client(base_url=a, timeout=30)
        created = create_chain(client, wav_bytes(tmp, 2.0))
        chain_id = created["chain"]["id"]
        branch_id = ready_branch(client, created["root"]["id"])
        last = client.get(f"/api/chains/{chain_id}").json()["chain"]["last_event_id"]
        near, far = Subscriber(a, chain_id, last), Subscriber(b, chain_id, last)
        for sub in (near, far):
            sub.start()
            sub.ready.wait(10)
        time.sleep(0.5)  # both streams past their replay
        sent: list[float] = []
        for i in range(events):
            action = "commit" if i % 2 == 0 else "uncommit"
            sent.append(time.monotonic())
            assert client.post(f"/api/nodes/{branch_id}/{action}").status_code == 200
            event_id = last + i + 1
            deadline = time.monotonic() + 10
            while not (event_id in near.arrivals and event_id in far.arrivals):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"event {event_id} did not arrive on both replicas")
                time.sleep(0.0005)
        client.close()
    ids = range(last + 1, last + events + 1)
    return (
        [near.arrivals[i] - t for i, t in zip(ids, sent, strict=True)],
        [far.arrivals[i] - t for i, t in zip(ids, sent, strict=True)],
    )


async def spine_times(pg: LocalPostgres, depth: int, repeat: int, tmp: Path) -> dict[str, float]:
    """Median seconds of the spine read as Nodes, on PostgreSQL and on SQLite."""
    dbs: dict[str, Database] = {
        "postgresql": PostgresDatabase(pg.new_database()),
        "sqlite": SqliteDatabase(tmp / f"spine-{depth}.db"),
    }
    try:
        reads = {}
        for name, db in dbs.items():
            await db.open()
            store = ChainStore(db, EventHub())
            chain_id, spine, _ = await build(store, depth)
            assert len(await store.spine(chain_id)) == len(spine)
            reads[name] = lambda store=store, chain_id=chain_id: store.spine(chain_id)
        return await interleaved(reads, repeat)
    finally:
        for db in dbs.values():
            await db.close()


def table_rows(options: Options) -> list[Row]:
    with local_postgres() as pg, tempfile.TemporaryDirectory() as folder:
        if pg is None:
            raise SystemExit("the cluster rows need PostgreSQL's server binaries (postgresql)")
        tmp = Path(folder)
        jobs = 16 if options.quick else 40
        rates = {}
        for workers in (1, 2, 4):
            progress(f"cluster: {jobs} jobs, {workers} worker(s)")
            rates[workers] = jobs_per_minute(pg, workers, jobs, tmp)
        rows = [
            Row(f"cluster: jobs/min, {n} mock worker(s) vs 1", rates[n], rates[1], "jobs/min")
            for n in (1, 2, 4)
        ]
        progress("cluster: event latency across replicas")
        near, far = event_latency(pg, 20 if options.quick else 100, tmp)
        rows.append(
            Row(
                "cluster: event latency p50, other replica vs writing one",
                statistics.median(far) * 1e3,
                statistics.median(near) * 1e3,
                "ms",
            )
        )
        for depth, repeat in ((1_000, 10), (10_000, 5 if options.quick else 15)):
            progress(f"cluster: spine at depth {depth:,}")
            t = asyncio.run(spine_times(pg, depth, repeat, tmp))
            rows.append(
                Row(
                    f"cluster: spine CTE depth {depth:,}, PostgreSQL vs SQLite",
                    t["postgresql"] * 1e3,
                    t["sqlite"] * 1e3,
                    "ms",
                )
            )
    return rows
