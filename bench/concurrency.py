"""Many musicians at once: N single-sibling branch requests on N chains sent together,
against one request alone, in the same run.

    python -m bench --only concurrency

A real ``sparrow serve`` in a child process runs the tiny random-weight MusicGen
(the real engine code; ``--musicgen-shape`` does not apply) with its in-process
worker. Each request is a 2 s continuation of a 2 s upload, ``context_s`` 2, on a
chain of its own. Timed, median of the rounds:

- ``alone``: one request, from sending it until its node is ``ready``;
- ``together``: ``N`` requests sent at once, until the last node is ``ready``.

The ratio together/alone is what the N-th musician waits compared with the first:
N when the worker runs the jobs one after another, and closer to 1 the more the
GPU (here the CPU) serves them at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
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
START_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Sizes:
    rounds: int


QUICK = Sizes(rounds=1)
FULL = Sizes(rounds=3)


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


def ready_together(url: str, roots: list[str], seed: int) -> float:
    """Seconds from sending one branch request per root at once until every node is ready."""
    with httpx.Client(base_url=url, timeout=30) as client:

        def send(i: int) -> str:
            response = client.post(
                f"/api/nodes/{roots[i]}/branch",
                json={"duration_s": DURATION_S, "context_s": 2.0, "seed": seed + i},
            )
            assert response.status_code == 202, response.text
            node_id: str = response.json()["nodes"][0]["id"]
            return node_id

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(roots)) as pool:
            nodes = list(pool.map(send, range(len(roots))))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node_id in nodes:
            while (status := client.get(f"/api/nodes/{node_id}").json()["status"]) != "ready":
                assert status in ("queued", "generating"), f"a branch ended {status}"
                assert time.monotonic() < deadline, "the branches did not end in time"
                time.sleep(0.02)
        elapsed = time.perf_counter() - started
        analysed(client, nodes)  # the analyser is idle again before the next round
        return elapsed


def measure(sizes: Sizes) -> tuple[float, float]:
    """(alone, together): median seconds of each."""
    from sparrow.engines.tiny import make_tiny_musicgen

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_tiny_musicgen(folder / "musicgen")
        clip = wav_bytes(folder, 2.0)
        with sparrow_serving(folder, model) as url, httpx.Client(base_url=url) as client:
            roots = [create_chain(client, clip)["root"]["id"] for _ in range(REQUESTS)]
            analysed(client, roots)
            ready_together(url, roots[:1], seed=0)  # warm: the first job pays for set-up
            alone, together = [], []
            for r in range(sizes.rounds):
                alone.append(ready_together(url, roots[:1], seed=100 * r))
                together.append(ready_together(url, roots, seed=100 * r + 10))
    return statistics.median(alone), statistics.median(together)


def table_rows(options: Options) -> list[Row]:
    alone, together = measure(QUICK if options.quick else FULL)
    return [
        Row(
            f"{REQUESTS} branch requests at once vs 1 alone (tiny model, {DURATION_S:g} s each): "
            "time until all are ready",
            together,
            alone,
            "s",
        )
    ]


if __name__ == "__main__":
    a, t = measure(FULL)
    print(f"alone {a:.2f} s, {REQUESTS} together {t:.2f} s: {t / a:.2f}x")
