"""A database locked by another process while the server runs, then released.

The real ``sparrow serve`` runs a job while a second process holds SQLite's
write lock on its database (``BEGIN EXCLUSIVE``), as a backup tool or a stray
``sqlite3`` shell would. During it: ``/readyz`` says the database takes no
writes within a few seconds, reads keep working (WAL), a write waits out the
busy timeout and is 503 ``storage_unavailable`` with ``Retry-After``, and the
job's end is not lost: its nodes become ready once the lock goes, with no
restart.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import httpx
from crashes import integrity_ok, mock_server
from faults import (
    assert_unavailable,
    branch,
    node_of,
    readiness,
    upload_sample,
    wait_generating,
    wait_nodes_ended,
    wait_not_ready,
    wait_ready,
)
from probe import wav_frames


def test_a_locked_database_is_reported_and_work_resumes_once_it_is_released(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with (
        mock_server(data_dir, tmp_path / "server.log", "10") as (_, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        chain_id, root = upload_sample(client)
        ids = branch(client, root["id"], duration_s=3, count=2)
        wait_generating(client, ids[0])

        other = sqlite3.connect(data_dir / "sparrow.db", isolation_level=None)
        with contextlib.closing(other):
            other.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            body = wait_not_ready(client, "database")
            shown_after_s = time.monotonic() - locked_at
            assert "locked" in body["problems"]["database"], body
            # Reads go on beside the lock.
            assert client.get(f"/api/chains/{chain_id}").status_code == 200
            audio = client.get(f"/api/nodes/{root['id']}/audio")
            assert audio.status_code == 200 and wav_frames(audio.content) == root["frames"]
            # A write waits for the lock (SQLite's busy timeout), then says why.
            started = time.monotonic()
            renamed = client.patch(f"/api/chains/{chain_id}", json={"title": "later"})
            write_s = time.monotonic() - started
            assert_unavailable(renamed, "storage_unavailable")
            # The job has generated its audio meanwhile; its end waits for the lock.
            time.sleep(1)
            statuses = {node_of(client, n)["status"] for n in ids}
            assert statuses == {"generating"}, statuses
            other.execute("ROLLBACK")
        released_at = time.monotonic()

        nodes = wait_nodes_ended(client, ids, ends=("ready",), timeout_s=20)
        ended_after_s = time.monotonic() - released_at
        for node in nodes:
            audio = client.get(f"/api/nodes/{node['id']}/audio")
            assert audio.status_code == 200 and wav_frames(audio.content) == node["frames"]
        wait_ready(client)
        assert readiness(client)[0] == 200
        assert client.patch(f"/api/chains/{chain_id}", json={"title": "now"}).status_code == 200
        gpu = client.get("/api/gpu").json()
        assert gpu["running"] == [] and gpu["queue_depth"] == 0
    integrity_ok(data_dir)
    print(
        f"locked database: /readyz 503 after {shown_after_s:.2f} s, a write answered 503 after "
        f"{write_s:.1f} s, the job's nodes ready {ended_after_s:.2f} s after the release"
    )
