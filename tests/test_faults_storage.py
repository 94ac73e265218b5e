"""A data dir that fills up or turns read-only while the server runs, and comes back.

Each test runs the real ``sparrow serve`` on a data dir of its own tmpfs (root
only: the tests skip without it; CI runs as root), injects the fault while a
generation and a separation are running, and checks what the server says
during it: uploads are 503 ``storage_unavailable`` with ``Retry-After`` (never
a 500, never the client's fault), ``/readyz`` names the storage, reads keep
working, and every node and stem reaches an end state with no restart. Once
the fault is removed the server is checked to recover by itself: ready again,
new work completes, and nothing acknowledged before the fault is lost.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from crashes import mock_server
from faults import (
    assert_unavailable,
    branch,
    fill,
    no_node_left_active,
    post_upload,
    remount,
    tmpfs,
    upload_sample,
    wait_generating,
    wait_nodes_ended,
    wait_not_ready,
    wait_ready,
    wait_stems_ended,
    wait_until,
)
from probe import wav_frames

STEP_MS = "10"  # mock engines: 0.5 s per second of audio, so faults land mid-job
# The tmpfs is small: a floor below what it holds once the database's 8 MiB reserve is
# released, above the reserve itself (so the reserve goes to recording job ends only).
SMALL_DISK = {"SPARROW_MIN_FREE_MB": "16"}


def _check_intact(client: httpx.Client, root: dict[str, Any]) -> None:
    """What was acknowledged before the fault: still there, its audio served whole."""
    audio = client.get(f"/api/nodes/{root['id']}/audio")
    assert audio.status_code == 200
    assert wav_frames(audio.content) == root["frames"]


def _check_recovered(client: httpx.Client, root: dict[str, Any]) -> None:
    """No restart: ready, new uploads, branches and stems complete, nothing lost."""
    _check_intact(client, root)
    assert post_upload(client).status_code == 201
    done = wait_nodes_ended(client, branch(client, root["id"]), timeout_s=20)
    assert done[0]["status"] == "ready", done
    assert client.post(f"/api/nodes/{root['id']}/stems").status_code == 202
    stems = wait_stems_ended(client, root["id"], timeout_s=20)
    assert stems["status"] == "ready", stems
    gpu = client.get("/api/gpu").json()
    assert gpu["running"] == [] and gpu["queue_depth"] == 0


def _start_job(client: httpx.Client) -> tuple[dict[str, Any], list[str]]:
    """An upload's root, and the ids of a two-sibling branch of it once it is generating."""
    _chain_id, root = upload_sample(client)
    ids = branch(client, root["id"], duration_s=4, count=2)
    wait_generating(client, ids[0])
    return root, ids


def _check_work_ends_unsaved(client: httpx.Client, root: dict[str, Any], ids: list[str]) -> None:
    """During the fault: the running job ends, and so do stems asked for meanwhile, each
    ``error`` / ``storage_unavailable`` (their audio cannot be saved); nothing stays active."""
    ended = wait_nodes_ended(client, ids, timeout_s=20)
    for node in ended:
        assert node["status"] == "error", node
        assert node["error"]["code"] == "storage_unavailable", node
    assert client.post(f"/api/nodes/{root['id']}/stems").status_code == 202
    stems = wait_stems_ended(client, root["id"], timeout_s=20)
    assert stems["status"] == "error" and stems["error"]["code"] == "storage_unavailable"
    assert no_node_left_active(client, root["chain_id"])


def test_a_full_disk_ends_every_job_answers_503_and_clears_by_itself(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "disk", 64) as data_dir,
        mock_server(data_dir, tmp_path / "server.log", STEP_MS, **SMALL_DISK) as (_, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        root, ids = _start_job(client)
        filler = fill(data_dir)
        full_at = time.monotonic()
        body = wait_not_ready(client, "storage")
        shown_after_s = time.monotonic() - full_at
        # "no space left on device", or "almost full" once the database's reserve went.
        assert re.search("no space left|almost full", body["problems"]["storage"]), body
        upload = assert_unavailable(post_upload(client), "storage_unavailable")
        assert "almost full" in upload["detail"], upload
        assert client.get("/api/chains").json()["total"] == 1  # reads keep working
        _check_intact(client, root)

        _check_work_ends_unsaved(client, root, ids)
        ended_after_s = time.monotonic() - full_at
        assert list((data_dir / "tmp").iterdir()) == []

        filler.unlink()
        freed_at = time.monotonic()
        wait_ready(client)
        ready_after_s = time.monotonic() - freed_at
        _check_recovered(client, root)
    print(
        f"full disk: /readyz 503 after {shown_after_s:.2f} s, job and stems ended after "
        f"{ended_after_s:.2f} s, ready {ready_after_s:.2f} s after space came back"
    )


def test_a_read_only_data_dir_ends_every_job_answers_503_and_clears_by_itself(
    tmp_path: Path,
) -> None:
    # The database lives elsewhere: a file system with a file open for writing
    # cannot be remounted read-only.
    with (
        tmpfs(tmp_path / "disk", 64) as data_dir,
        mock_server(
            data_dir,
            tmp_path / "server.log",
            STEP_MS,
            SPARROW_DATABASE_PATH=str(tmp_path / "sparrow.db"),
            **SMALL_DISK,
        ) as (_, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        root, ids = _start_job(client)
        remount(data_dir, read_only=True)
        try:
            body = wait_not_ready(client, "storage")
            assert "read-only file system" in body["problems"]["storage"]
            upload = assert_unavailable(post_upload(client), "storage_unavailable")
            assert "read-only file system" in upload["detail"]
            _check_intact(client, root)
            _check_work_ends_unsaved(client, root, ids)
        finally:
            remount(data_dir, read_only=False)
        wait_ready(client)
        _check_recovered(client, root)


def test_a_server_started_on_a_full_disk_serves_reads_and_says_so_until_there_is_room(
    tmp_path: Path,
) -> None:
    """So full that SQLite cannot even make its WAL files: the database's reserve (made
    by the first start) is released, the server starts, and it recovers by itself."""
    with tmpfs(tmp_path / "disk", 64) as data_dir:
        with (
            mock_server(data_dir, tmp_path / "first.log", STEP_MS, **SMALL_DISK) as (proc, base),
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            _chain_id, root = upload_sample(client)
            # A clean stop: SQLite removes its WAL files, which the next start must make.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
            assert not (data_dir / "sparrow.db-wal").exists()
        assert (data_dir / "sparrow.db.reserve").stat().st_size == 8 << 20
        filler = fill(data_dir)
        with (
            mock_server(
                data_dir, tmp_path / "second.log", STEP_MS, wait_for="/healthz", **SMALL_DISK
            ) as (_, base),
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            body = wait_not_ready(client, "storage")
            assert "almost full" in body["problems"]["storage"], body
            assert body["checks"]["database"] is True, body
            _check_intact(client, root)  # reads work
            assert_unavailable(post_upload(client), "storage_unavailable")
            filler.unlink()
            wait_ready(client)
            _check_recovered(client, root)
            # Room again: the reserve is back, for the next time.
            wait_until(
                lambda: (data_dir / "sparrow.db.reserve").exists(), timeout_s=10, what="reserve"
            )
        log = (tmp_path / "second.log").read_text()
        assert "releasing the database's reserve" in log, log
