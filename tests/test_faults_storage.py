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
import time
from pathlib import Path
from typing import Any

import httpx
from crashes import mock_server
from faults import (
    assert_unavailable,
    fill,
    no_node_left_active,
    remount,
    tmpfs,
    wait_not_ready,
    wait_ready,
    wait_until,
)
from helpers import SAMPLE
from probe import wav_frames

STEP_MS = "10"  # mock engines: 0.5 s per second of audio, so faults land mid-job
# The tmpfs is small: a floor below what it holds once the database's 8 MiB reserve is
# released, above the reserve itself (so the reserve goes to recording job ends only).
SMALL_DISK = {"SPARROW_MIN_FREE_MB": "16"}


def _upload(client: httpx.Client) -> httpx.Response:
    return client.post("/api/chains", files={"file": ("sample.flac", SAMPLE.read_bytes())})


def _branch(client: httpx.Client, parent_id: str, **body: Any) -> list[dict[str, Any]]:
    response = client.post(
        f"/api/nodes/{parent_id}/branch", json={"prompt": "x", "duration_s": 4, **body}
    )
    assert response.status_code == 202, response.text
    nodes: list[dict[str, Any]] = response.json()["nodes"]
    return nodes


def _node(client: httpx.Client, node_id: str) -> dict[str, Any]:
    node: dict[str, Any] = client.get(f"/api/nodes/{node_id}").json()
    return node


def _stems(client: httpx.Client, node_id: str) -> dict[str, Any]:
    stems: dict[str, Any] = client.get(f"/api/nodes/{node_id}/stems").json()
    return stems


def _ended(client: httpx.Client, node_ids: list[str]) -> list[dict[str, Any]] | None:
    nodes = [_node(client, n) for n in node_ids]
    return nodes if all(n["status"] in ("ready", "error", "cancelled") for n in nodes) else None


def _stems_ended(client: httpx.Client, node_id: str) -> dict[str, Any] | None:
    stems = _stems(client, node_id)
    return stems if stems["status"] in ("ready", "error", "cancelled") else None


def _check_intact(client: httpx.Client, root: dict[str, Any]) -> None:
    """What was acknowledged before the fault: still there, its audio served whole."""
    audio = client.get(f"/api/nodes/{root['id']}/audio")
    assert audio.status_code == 200
    assert wav_frames(audio.content) == root["frames"]


def _check_recovered(client: httpx.Client, root: dict[str, Any]) -> None:
    """No restart: ready, new uploads, branches and stems complete, nothing lost."""
    _check_intact(client, root)
    assert _upload(client).status_code == 201
    fresh = _branch(client, root["id"], duration_s=1)
    done = wait_until(lambda: _ended(client, [fresh[0]["id"]]), timeout_s=20, what="a new branch")
    assert done[0]["status"] == "ready", done
    assert client.post(f"/api/nodes/{root['id']}/stems").status_code == 202
    stems = wait_until(lambda: _stems_ended(client, root["id"]), timeout_s=20, what="new stems")
    assert stems["status"] == "ready", stems
    gpu = client.get("/api/gpu").json()
    assert gpu["running"] == [] and gpu["queue_depth"] == 0


def _start_job(client: httpx.Client) -> tuple[dict[str, Any], list[str]]:
    """An upload's root, and the ids of a two-sibling branch of it once it is generating."""
    created = _upload(client)
    assert created.status_code == 201
    root: dict[str, Any] = created.json()["root"]
    ids = [n["id"] for n in _branch(client, root["id"], count=2)]
    wait_until(
        lambda: _node(client, ids[0])["status"] == "generating", timeout_s=10, what="generating"
    )
    return root, ids


def _check_work_ends_unsaved(client: httpx.Client, root: dict[str, Any], ids: list[str]) -> None:
    """During the fault: the running job ends, and so do stems asked for meanwhile, each
    ``error`` / ``storage_unavailable`` (their audio cannot be saved); nothing stays active."""
    ended = wait_until(lambda: _ended(client, ids), timeout_s=20, what="the job's end")
    for node in ended:
        assert node["status"] == "error", node
        assert node["error"]["code"] == "storage_unavailable", node
    assert client.post(f"/api/nodes/{root['id']}/stems").status_code == 202
    stems = wait_until(lambda: _stems_ended(client, root["id"]), timeout_s=20, what="stems")
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
        upload = assert_unavailable(_upload(client), "storage_unavailable")
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
            upload = assert_unavailable(_upload(client), "storage_unavailable")
            assert "read-only file system" in upload["detail"]
            _check_intact(client, root)
            _check_work_ends_unsaved(client, root, ids)
        finally:
            remount(data_dir, read_only=False)
        wait_ready(client)
        _check_recovered(client, root)
