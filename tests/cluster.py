"""A real cluster for tests: PostgreSQL, ``sparrow serve`` replicas and ``sparrow worker``
processes, all on 127.0.0.1, sharing one data dir and one fresh database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from faults import wait_until
from live import free_port, sparrow_env


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path
    base: str | None = None  # a replica's URL

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL


@dataclass
class Cluster:
    database_url: str
    root: Path
    env: dict[str, str]
    replicas: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)

    def _spawn(self, command: str, name: str, **extra_env: str) -> Process:
        log = self.root / f"{name}.log"
        env = {**self.env, **extra_env}
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparrow", command],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return Process(proc, log)

    def spawn_replica(self, **extra_env: str) -> Process:
        port = free_port()
        replica = self._spawn(
            "serve", f"replica{len(self.replicas)}", SPARROW_PORT=str(port), **extra_env
        )
        replica.base = f"http://127.0.0.1:{port}"
        self.replicas.append(replica)
        return replica

    def wait_replica(self, replica: Process, *, timeout_s: float = 30) -> None:
        def ready() -> bool:
            if replica.proc.poll() is not None:
                raise AssertionError(f"the replica exited:\n{replica.text()}")
            try:
                return httpx.get(f"{replica.base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout_s=timeout_s, what="a replica to be ready")

    def start_replica(self, **extra_env: str) -> Process:
        replica = self.spawn_replica(**extra_env)
        self.wait_replica(replica)
        return replica

    def start_worker(self, **extra_env: str) -> Process:
        """A ``sparrow worker``, waited for until a replica lists it."""
        before = len(self.live_workers())
        worker = self._spawn("worker", f"worker{len(self.workers)}", **extra_env)
        self.workers.append(worker)

        def listed() -> bool:
            if worker.proc.poll() is not None:
                raise AssertionError(f"the worker exited:\n{worker.text()}")
            return len(self.live_workers()) > before

        wait_until(listed, timeout_s=30, what="the worker to be listed")
        return worker

    def client(self, replica: int = 0) -> httpx.Client:
        base = self.replicas[replica].base
        assert base is not None
        return httpx.Client(base_url=base, timeout=10)

    def live_workers(self) -> list[dict[str, Any]]:
        with self.client() as client:
            workers: list[dict[str, Any]] = client.get("/api/gpu").json()["workers"]
            return workers

    def job_starts(self, chain_id: str) -> list[int]:
        """How many jobs of the chain each worker's log says it started."""
        return [w.text().count(f"chain {chain_id}) started") for w in self.workers]

    def worker_started(
        self, chain_id: str, since: list[int] | None = None, *, timeout_s: float = 15
    ) -> Process:
        """The worker that starts the chain's next job after ``since`` (``job_starts``)."""
        before = since or [0] * len(self.workers)

        def started() -> Process | None:
            now = self.job_starts(chain_id)
            return next(
                (w for w, n, m in zip(self.workers, now, before, strict=True) if n > m), None
            )

        return wait_until(started, timeout_s=timeout_s, what=f"a job of chain {chain_id}")

    def stop(self) -> None:
        for process in [*self.workers, *self.replicas]:
            if process.proc.poll() is None:
                process.proc.kill()
            process.proc.wait(10)


@contextmanager
def running_cluster(
    database_url: str, root: Path, *, replicas: int = 2, workers: int = 2, **env: str
) -> Iterator[Cluster]:
    """PostgreSQL-backed Sparrow: ``replicas`` servers and ``workers`` workers, mock engine."""
    data_dir = root / "data"
    defaults = {
        "SPARROW_DATA_DIR": str(data_dir),
        "SPARROW_DATABASE_URL": database_url,
        "SPARROW_ENGINE": "mock",
        "SPARROW_MOCK_STEP_MS": "10",
        "SPARROW_WORKER_STALL_S": "3",
    }
    base_env = sparrow_env(**{**defaults, **env})  # the test's own values win
    cluster = Cluster(database_url, root, base_env)
    try:
        for _ in range(replicas):
            cluster.start_replica()
        for _ in range(workers):
            cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()


def wait_ready_node(client: httpx.Client, node_id: str, *, timeout_s: float = 30) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        node: dict[str, Any] = client.get(f"/api/nodes/{node_id}").json()
        return node if node["status"] not in ("queued", "generating") else None

    return wait_until(ended, timeout_s=timeout_s, what=f"node {node_id} to end")


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
