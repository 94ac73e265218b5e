"""What the fault-injection tests share: faults made real, and the checks made during them.

- ``tmpfs``: a small file system of its own for a data dir (root only; the test
  skips with the reason otherwise), to ``fill`` up and to ``remount`` read-only.
- ``FFmpegStandIn``: an ``ffmpeg`` that behaves as its mode file says — works
  (runs the real one), fails, hangs, writes nothing, or writes garbage — so a test
  breaks FFmpeg and mends it again while the server runs.
- ``assert_unavailable``: a 503 with its code, ``Retry-After``, and no server path.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest

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


def no_node_left_active(client: httpx.Client, chain_id: str) -> bool:
    nodes = client.get(f"/api/chains/{chain_id}").json()["nodes"]
    return all(n["status"] not in ("queued", "generating") for n in nodes)


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
    elif [ "$out" = "pipe:1" ]; then head -c 65536 /dev/urandom
    else head -c 65536 /dev/urandom > "$out"; fi
    exit 0 ;;
esac
exit 2
"""
        )
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def set(self, mode: Mode) -> None:
        self.mode_file.write_text(mode)
