"""Many musicians at once: N single-sibling branch requests on N chains sent together,
against one request alone, batched across requests and not, in the same run.

    python -m bench --only concurrency

Real ``sparrow serve`` processes run the tiny random-weight MusicGen (the real
engine code and Sparrow's decoding loop; ``--musicgen-shape`` does not apply) with
their in-process worker: one with the default ``SPARROW_MAX_BATCH`` (8), one with
``SPARROW_MAX_BATCH=1`` (one row at a time, the worker as it was before batching).
Each request is a 2 s continuation of a 2 s upload, ``context_s`` 2, on a chain of
its own. Timed, median of the rounds, after one untimed round of each:

- ``alone``: one request, from sending it until its node is ``ready``;
- ``together``: ``N`` requests sent at once, until the last node is ``ready``.

together/alone is what the N-th musician waits compared with the first: N when the
worker decodes one request after another, closer to 1 the more the GPU (here the
CPU) serves them at once. Then, on the batching server, **late arrivals**: a long
batch (4 requests of 12 s) decodes, and once it is a third done 4 more requests
arrive; each one's wait until its first ``node-progress`` event (a real SSE client
per chain) is set against the long batch's remaining time. Rows that join at a step
boundary start within a step or two; rows that waited for the batch would wait all
of it. Last, **a steady load**: the same rounds, each sent as soon as the one before
is ready, while the analyser works on the nodes before it (every other round waits
for the analyser to be idle): what the analysis costs the musicians waiting for
their continuations, 1 when nothing. And **a busy API**: the same rounds while
``READERS`` clients read ``GET /api/chains`` back to back, against the rounds with the
API idle: what the server's own Python (the routes) costs the decoding, which runs in a
process of its own (``SPARROW_ENGINE_PROCESS``) so that it costs little.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.seed import analysed, create_chain, wav_bytes
from bench.servers import HOST, free_port
from bench.table import Options, Row

REQUESTS = 8
DURATION_S = 2.0
LONG_S = 12.0  # the late arrivals' long batch: this many seconds per request
LONG_REQUESTS = 4
LATE_REQUESTS = 4
LATE_AT = 1 / 3  # the long batch's progress when the late requests are sent
READERS = 2  # clients reading the chain list back to back in the busy-API rounds
START_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Sizes:
    rounds: int


QUICK = Sizes(rounds=1)
FULL = Sizes(rounds=5)


@contextlib.contextmanager
def sparrow_serving(folder: Path, model: Path, **env: str) -> Iterator[str]:
    """``sparrow serve`` on the tiny model until the block ends; its base URL."""
    port = free_port()
    environment = {
        **os.environ,
        "SPARROW_DATA_DIR": str(folder / f"data-{port}"),
        "SPARROW_PORT": str(port),
        "SPARROW_MUSICGEN_MODEL": str(model),
        "SPARROW_PRELOAD_MODEL": "true",
        **env,
    }
    log = (folder / f"sparrow-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sparrow", "serve"], env=environment, stdout=log, stderr=log
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/api/gpu", timeout=2).json()["generation"]["loaded"]:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sparrow serve did not start: see {log.name}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def send_branch(client: httpx.Client, root: str, seed: int, duration_s: float) -> str:
    response = client.post(
        f"/api/nodes/{root}/branch",
        json={"duration_s": duration_s, "context_s": 2.0, "seed": seed},
    )
    assert response.status_code == 202, response.text
    node_id: str = response.json()["nodes"][0]["id"]
    return node_id


def wait_ready(client: httpx.Client, nodes: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for node_id in nodes:
        while (status := client.get(f"/api/nodes/{node_id}").json()["status"]) != "ready":
            assert status in ("queued", "generating"), f"a branch ended {status}"
            assert time.monotonic() < deadline, "the branches did not end in time"
            time.sleep(0.02)


def ready_together(url: str, roots: list[str], seed: int, *, settle: bool = True) -> float:
    """Seconds from sending one branch request per root at once until every node is ready;
    ``settle``: then waits for their analyses (else they run into what comes next)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(roots)) as pool:
            nodes = list(
                pool.map(
                    lambda i: send_branch(client, roots[i], seed + i, DURATION_S), range(len(roots))
                )
            )
        wait_ready(client, nodes)
        elapsed = time.perf_counter() - started
        if settle:
            analysed(client, nodes)  # the analyser is idle again before the next round
        return elapsed


def first_progress(url: str, root: str, seed: int) -> float:
    """Seconds from sending a branch request on ``root``'s chain until its first
    ``node-progress`` event reaches a client of the chain's stream."""
    with httpx.Client(base_url=url, timeout=READY_TIMEOUT_S) as client:
        chain = client.get(f"/api/nodes/{root}").json()["chain_id"]
        last = client.get(f"/api/chains/{chain}").json()["chain"]["last_event_id"]
        headers = {"Last-Event-ID": str(last)}
        with client.stream("GET", f"/api/chains/{chain}/events", headers=headers) as stream:
            started = time.perf_counter()
            send_branch(client, root, seed, DURATION_S)
            for line in stream.iter_lines():
                if line == "event: node-progress":
                    return time.perf_counter() - started
    raise AssertionError("the stream ended before any progress")


def late_arrivals(url: str, roots: list[str]) -> tuple[float, float]:
    """(the late requests' median wait until their first progress, the long batch's
    remaining time when they were sent), in seconds."""
    long_roots, late_roots = roots[:LONG_REQUESTS], roots[LONG_REQUESTS:]
    with httpx.Client(base_url=url, timeout=30) as client:
        long_nodes = [send_branch(client, r, 500 + i, LONG_S) for i, r in enumerate(long_roots)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            rows = client.get("/api/gpu").json()["batch"]["rows"]
            done = [r["progress"] for r in rows if r["node_id"] in long_nodes and r["decoding"]]
            if len(done) == LONG_REQUESTS and min(done) >= LATE_AT:
                break
            assert time.monotonic() < deadline, "the long batch did not start"
            time.sleep(0.01)
        sent = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(LATE_REQUESTS) as pool:
            waits = list(
                pool.map(
                    lambda i: first_progress(url, late_roots[i], 600 + i), range(LATE_REQUESTS)
                )
            )
        wait_ready(client, long_nodes)
        remaining = time.perf_counter() - sent
        analysed(client, long_nodes)
    return statistics.median(waits), remaining


def together_while_reading(url: str, roots: list[str], sizes: Sizes) -> float:
    """The median of ``sizes.rounds`` rounds of N at once, each while ``READERS`` clients
    read ``GET /api/chains`` back to back."""
    stop = threading.Event()

    def read() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                assert client.get("/api/chains").status_code == 200

    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        readers = [pool.submit(read) for _ in range(READERS)]
        try:
            rounds = [ready_together(url, roots, seed=700 + 10 * r) for r in range(sizes.rounds)]
        finally:
            stop.set()
        for reader in readers:
            reader.result()
    return statistics.median(rounds)


@dataclass(frozen=True)
class Measured:
    alone: float  # batching server, one request (s)
    together: float  # batching server, N at once (s)
    alone_unbatched: float
    together_unbatched: float
    late_wait: float  # median wait of a late request until its first progress (s)
    late_remaining: float  # the long batch's remaining time when they came (s)
    together_steady: float  # N at once, each round sent while the last one's are analysed
    together_reading: float  # N at once while READERS clients read the chain list


def timed_rounds(
    url: str, roots: list[str], sizes: Sizes, *, settle: bool = True
) -> tuple[float, float]:
    # Warm, once each: the first job pays for set-up, and the first N at once for what
    # only N rows at once set up (in Sparrow's loop, its buffers growing to N rows).
    ready_together(url, roots[:1], seed=0)
    ready_together(url, roots, seed=1)
    alone, together = [], []
    for r in range(sizes.rounds):
        alone.append(ready_together(url, roots[:1], seed=100 * r, settle=settle))
        together.append(ready_together(url, roots, seed=100 * r + 10, settle=settle))
    return statistics.median(alone), statistics.median(together)


def measure(sizes: Sizes) -> Measured:
    from sparrow.engines.tiny import make_tiny_musicgen

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_tiny_musicgen(folder / "musicgen")
        clip = wav_bytes(folder, 2.0)
        results: dict[str, tuple[float, float]] = {}
        for name, env in (("batched", {}), ("unbatched", {"SPARROW_MAX_BATCH": "1"})):
            with sparrow_serving(folder, model, **env) as url, httpx.Client(base_url=url) as client:
                roots = [create_chain(client, clip)["root"]["id"] for _ in range(REQUESTS)]
                analysed(client, roots)
                results[name] = timed_rounds(url, roots, sizes)
                if name == "batched":
                    late = late_arrivals(url, roots)
                    _, steady = timed_rounds(url, roots, sizes, settle=False)
                    analysed(client, roots)
                    reading = together_while_reading(url, roots, sizes)
    return Measured(*results["batched"], *results["unbatched"], *late, steady, reading)


def table_rows(options: Options) -> list[Row]:
    m = measure(QUICK if options.quick else FULL)
    each = f"tiny model, {DURATION_S:g} s each"
    return [
        Row(
            f"{REQUESTS} branch requests at once vs 1 alone ({each}, batched): "
            "time until all are ready",
            m.together,
            m.alone,
            "s",
        ),
        Row(
            f"{REQUESTS} branch requests at once vs 1 alone ({each}, SPARROW_MAX_BATCH=1)",
            m.together_unbatched,
            m.alone_unbatched,
            "s",
        ),
        Row(
            f"{REQUESTS} branch requests at once, batched vs SPARROW_MAX_BATCH=1",
            m.together,
            m.together_unbatched,
            "s",
        ),
        Row(
            f"{LATE_REQUESTS} requests arriving while {LONG_REQUESTS}x{LONG_S:g} s decode: wait "
            "until their first progress event vs the batch's remaining time",
            m.late_wait,
            m.late_remaining,
            "s",
        ),
        Row(
            f"{REQUESTS} branch requests at once, each round sent while the nodes of the "
            "rounds before are analysed vs with the analyser idle",
            m.together_steady,
            m.together,
            "s",
        ),
        Row(
            f"{REQUESTS} branch requests at once while {READERS} clients read GET /api/chains "
            "back to back vs with the API idle",
            m.together_reading,
            m.together,
            "s",
        ),
    ]


if __name__ == "__main__":
    for row in table_rows(Options()):
        print(f"{row.name}: {row.measured:.2f} s vs {row.baseline:.2f} s = {row.ratio:.2f}x")
