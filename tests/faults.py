"""What the fault-injection tests share: faults made real, and the checks made during them.

- ``tmpfs``: a small file system of its own for a data dir (root only; the test
  skips with the reason otherwise), to ``fill`` up and to ``remount`` read-only.
- ``FFmpegStandIn``: an ``ffmpeg`` that behaves as its mode file says — works
  (runs the real one), fails, hangs, writes nothing, or writes garbage — so a test
  breaks FFmpeg and mends it again while the server runs.
- ``assert_unavailable``: a 503 with its code, ``Retry-After``, and no server path.
- The API calls the tests make of the server under test: ``upload_sample`` (or
  ``post_upload`` for the bare answer), ``branch``, ``node_of`` and ``stems_of``,
  and bounded waits for a node to be generating, for nodes to end
  (``wait_nodes_ended``: no longer queued/generating, or in a given set of
  statuses) and for a node's stems to end (no longer queued/separating).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest
from helpers import SAMPLE

from sparrow.audio import ffmpeg_exe

T = TypeVar("T")

Mode = Literal["ok", "fail", "hang", "empty", "garbage", "slow"]

# An absolute path in a sentence: a slash that starts a word.
_PATH = re.compile(r"(?:^|[\s(\"'=:])/[\w.-]")


def wait_until(
    check: Callable[[], T | None], *, timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> T:
    """Poll ``check()`` until it returns something other than None or False; bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or check}")
        time.sleep(interval_s)


def assert_unavailable(response: httpx.Response, code: str) -> dict[str, Any]:
    """A 503 ``{"error": code, ...}`` with ``Retry-After``, whose detail shows no path."""
    assert response.status_code == 503, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert int(response.headers["retry-after"]) > 0
    assert not _PATH.search(body["detail"]), body["detail"]
    return body


def readiness(client: httpx.Client) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    return response.status_code, response.json()


def wait_ready(client: httpx.Client, *, timeout_s: float = 10) -> None:
    wait_until(lambda: readiness(client)[0] == 200, timeout_s=timeout_s, what="/readyz 200")


def wait_not_ready(client: httpx.Client, check: str, *, timeout_s: float = 10) -> dict[str, Any]:
    """Poll until /readyz is 503 with ``check`` failing; returns its body."""

    def failing() -> dict[str, Any] | None:
        status, body = readiness(client)
        return body if status == 503 and not body["checks"][check] else None

    return wait_until(failing, timeout_s=timeout_s, what=f"/readyz to fail {check}")


# -- requests -------------------------------------------------------------------------

NODE_ACTIVE = ("queued", "generating")
STEMS_ACTIVE = ("queued", "separating")


def post_upload(
    client: httpx.Client, content: bytes | None = None, *, name: str = "sample.flac"
) -> httpx.Response:
    """``POST /api/chains`` of ``content`` (by default ``data/sample.flac``) as ``name``."""
    data = SAMPLE.read_bytes() if content is None else content
    return client.post("/api/chains", files={"file": (name, data, "application/octet-stream")})


def upload_sample(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """A new chain of ``data/sample.flac`` (asserted 201): its id and its root."""
    created = post_upload(client)
    assert created.status_code == 201, created.text
    body = created.json()
    return body["chain"]["id"], body["root"]


def branch(
    client: httpx.Client,
    parent_id: str,
    *,
    duration_s: float = 1.0,
    count: int = 1,
    prompt: str = "x",
) -> list[str]:
    """Continuations of ``parent_id`` (asserted 202): the new nodes' ids."""
    response = client.post(
        f"/api/nodes/{parent_id}/branch",
        json={"prompt": prompt, "duration_s": duration_s, "count": count},
    )
    assert response.status_code == 202, response.text
    return [n["id"] for n in response.json()["nodes"]]


def node_of(client: httpx.Client, node_id: str) -> dict[str, Any]:
    """``GET /api/nodes/{node_id}``'s body."""
    body: dict[str, Any] = client.get(f"/api/nodes/{node_id}").json()
    return body


def stems_of(client: httpx.Client, node_id: str) -> dict[str, Any]:
    """``GET /api/nodes/{node_id}/stems``'s body."""
    body: dict[str, Any] = client.get(f"/api/nodes/{node_id}/stems").json()
    return body


def no_node_left_active(client: httpx.Client, chain_id: str) -> bool:
    nodes = client.get(f"/api/chains/{chain_id}").json()["nodes"]
    return all(n["status"] not in NODE_ACTIVE for n in nodes)


def wait_generating(client: httpx.Client, node_id: str, *, timeout_s: float = 10) -> None:
    """Poll until the node is ``generating``; bounded."""
    wait_until(
        lambda: node_of(client, node_id)["status"] == "generating",
        timeout_s=timeout_s,
        what=f"node {node_id} to be generating",
    )


def wait_nodes_ended(
    client: httpx.Client,
    node_ids: Sequence[str],
    *,
    ends: Collection[str] | None = None,
    timeout_s: float = 30,
) -> list[dict[str, Any]]:
    """The nodes once each has left queued/generating, or (given ``ends``) once each
    one's status is among ``ends``; bounded."""

    def ended() -> list[dict[str, Any]] | None:
        nodes = [node_of(client, n) for n in node_ids]
        if ends is None:
            return nodes if all(n["status"] not in NODE_ACTIVE for n in nodes) else None
        return nodes if all(n["status"] in ends for n in nodes) else None

    return wait_until(ended, timeout_s=timeout_s, what=f"nodes {list(node_ids)} to end")


def wait_stems_ended(
    client: httpx.Client, node_id: str, *, timeout_s: float = 30
) -> dict[str, Any]:
    """The node's stems once they have left queued/separating; bounded."""

    def ended() -> dict[str, Any] | None:
        stems = stems_of(client, node_id)
        return stems if stems["status"] not in STEMS_ACTIVE else None

    return wait_until(ended, timeout_s=timeout_s, what=f"the stems of {node_id} to end")


# -- file systems ---------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` mounted at ``path`` for the block (skips without root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazily: a server killed a moment ago may still hold a file open for a while.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096, 512):  # then whatever smaller writes can still find
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def remount(path: Path, *, read_only: bool) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)],
        check=True,
        capture_output=True,
    )


# -- FFmpeg ---------------------------------------------------------------------------


class FFmpegStandIn:
    """An ``ffmpeg`` whose behaviour the test switches while the server runs.

    ``ok`` runs the real FFmpeg; ``slow`` does so after a second; ``fail`` exits 1;
    ``hang`` never ends; ``empty`` exits 0 having written nothing; ``garbage`` writes
    random bytes where the output should go (a file, or the pipe) and exits 0.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "ffmpeg"
        self.mode_file = folder / "mode"
        self.set("ok")
        real = ffmpeg_exe()
        # FFmpeg runs with a minimal environment: everything is spelled out here.
        self.path.write_text(
            f"""#!/bin/sh
mode=$(cat '{self.mode_file}')
prev=; last=
for arg; do prev=$last; last=$arg; done
case "$mode" in
  ok) exec '{real}' "$@" ;;
  slow) /bin/sleep 1; exec '{real}' "$@" ;;
  fail) echo "stand-in: failing on purpose" >&2; exit 1 ;;
  hang) exec /bin/sleep 600 ;;
  empty) exit 0 ;;
  garbage)
    out=${{last#file:}}
    if [ "$prev" = "-i" ]; then exit 0  # a probe: it writes no file
    elif [ "$out" = "pipe:1" ] || [ "$out" = "-" ]; then head -c 65536 /dev/urandom
    else head -c 65536 /dev/urandom > "$out"; fi
    exit 0 ;;
esac
exit 2
"""
        )
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def set(self, mode: Mode) -> None:
        self.mode_file.write_text(mode)
