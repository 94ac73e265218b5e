"""What the kill -9 tests share: ``sparrow serve`` with the mock engines, the kill,
and the checks made once the process is dead or restarted."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from live import free_port, server_process
from probe import wav_frames


@contextmanager
def mock_server(
    data_dir: Path, log: Path, step_ms: str, *, wait_for: str = "/readyz", **extra_env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``sparrow serve`` with the mock engines; yields the process and its base URL."""
    port = free_port()
    with server_process(
        data_dir,
        port,
        log=log,
        wait_for=wait_for,
        SPARROW_ENGINE="mock",
        SPARROW_MOCK_STEP_MS=step_ms,
        **extra_env,
    ) as proc:
        yield proc, f"http://127.0.0.1:{port}"


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def integrity_ok(data_dir: Path) -> None:
    """``PRAGMA integrity_check`` of the data dir's database, read with no server running."""
    with contextlib.closing(sqlite3.connect(data_dir / "sparrow.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def check_audio(client: httpx.Client, node: dict[str, Any]) -> None:
    """A node's audio route, given the node as read just before: 409 while the node is
    not ready; once it is, the whole file of exactly ``frames`` and nothing else."""
    response = client.get(f"/api/nodes/{node['id']}/audio")
    if node["status"] != "ready" and response.status_code != 200:
        assert response.status_code == 409, (node["status"], response.status_code)
        return
    assert response.status_code == 200, (node["status"], response.status_code)
    if node["status"] != "ready":  # it became ready after it was read
        node = client.get(f"/api/nodes/{node['id']}").json()
        assert node["status"] == "ready"
    assert wav_frames(response.content) == node["frames"]
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
