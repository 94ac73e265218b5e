"""Small JSON routes of the real Sparrow app against a bare Starlette app, in the same run.

    python -m bench --only http

Sparrow runs as ``sparrow serve`` would build it (on the mock engine, over a SQLite
file holding a few chains); the baseline is a plain Starlette app that answers the
same paths with the same JSON bodies, so what differs is everything Sparrow does
per request: its middleware (CORS, HEAD, body limit), FastAPI's routing and
validation, the database read, and the response model. Both are served by uvicorn
in a child process and driven by one ``httpx.Client`` each, with keep-alive, from
this process; batches of requests alternate between the two servers.

Requests per second are the median over rounds of one batch's rate. The client
costs the same per request for both, so on a small machine the baseline's rate is
partly the client's: the true gap between the apps is, if anything, wider.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import servers
from bench.seed import analysed, create_chain, wav_bytes
from bench.table import Options, Row
from bench.timing import rotations

CHAINS = 3
WARM_UP = 50


@dataclass(frozen=True)
class Sizes:
    rounds: int
    requests: int  # per batch


QUICK = Sizes(rounds=8, requests=40)
FULL = Sizes(rounds=25, requests=80)


def seed_routes(client: httpx.Client, folder: Path) -> dict[str, str]:
    """Create ``CHAINS`` chains; the paths to compare, by a label for the table."""
    created = [create_chain(client, wav_bytes(folder, 1.0, seed=i)) for i in range(CHAINS)]
    analysed(client, [c["root"]["id"] for c in created])
    root_id = created[-1]["root"]["id"]
    return {
        f"GET /api/chains ({CHAINS} chains)": "/api/chains",
        "GET /api/nodes/{id}": f"/api/nodes/{root_id}",
        "GET /healthz": "/healthz",
    }


def batch_rate(client: httpx.Client, path: str, requests: int) -> float:
    """Requests per second of ``requests`` sequential GETs of ``path`` on one connection."""
    start = time.perf_counter()
    for _ in range(requests):
        response = client.get(path)
        assert response.status_code == 200, response.text
    return requests / (time.perf_counter() - start)


def compare(
    clients: dict[str, httpx.Client], paths: dict[str, str], sizes: Sizes
) -> dict[str, dict[str, float]]:
    """Median requests/s per route label and server, batches interleaved."""
    rates: dict[str, dict[str, list[float]]] = {
        label: {name: [] for name in clients} for label in paths
    }
    for client in clients.values():
        for path in paths.values():
            batch_rate(client, path, WARM_UP)
    for order in rotations(list(clients), sizes.rounds):
        for label, path in paths.items():
            for name in order:
                rates[label][name].append(batch_rate(clients[name], path, sizes.requests))
    return {
        label: {name: statistics.median(samples) for name, samples in by_server.items()}
        for label, by_server in rates.items()
    }


def table_rows(options: Options) -> list[Row]:
    sizes = QUICK if options.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data_dir = folder / "data"
        with (
            servers.serve("sparrow", folder, "--data-dir", str(data_dir)) as sparrow_url,
            httpx.Client(base_url=sparrow_url) as sparrow,
        ):
            paths = seed_routes(sparrow, folder)
            bodies = folder / "bodies.json"
            bodies.write_text(json.dumps({p: sparrow.get(p).json() for p in paths.values()}))
            with (
                servers.serve("bare", folder, "--bodies", str(bodies)) as bare_url,
                httpx.Client(base_url=bare_url) as bare,
            ):
                rates = compare({"sparrow": sparrow, "bare": bare}, paths, sizes)
    return [
        Row(f"{label}: Sparrow vs bare Starlette", r["sparrow"], r["bare"], "req/s")
        for label, r in rates.items()
    ]
