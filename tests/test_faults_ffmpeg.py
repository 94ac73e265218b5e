"""A broken FFmpeg against the real server: 503s while it lasts, recovery by itself after.

Each test runs ``sparrow serve`` (mock engines) on 127.0.0.1 with an FFmpeg stand-in
(``faults.FFmpegStandIn``) that works until the test breaks it: it fails, hangs,
writes nothing, or writes garbage. While it is broken, ``/readyz`` is 503 saying
why, an upload and an export are 503 ``engine_unavailable`` with ``Retry-After``
(never a 415/422 that blames the file), nothing of them is kept on disk, and a
continuation or a stems job that needs FFmpeg ends ``error`` with that code rather
than staying active. Once it is mended, the same process is ready again within a
bounded time, takes uploads, makes the exports it refused (afresh: correct files,
checked with ffprobe), generates and separates; every chain acknowledged before the
fault is still there and its audio is served.

With a working FFmpeg, a file that really is bad stays the client's fault.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from crashes import check_audio, mock_server
from faults import (
    FFmpegStandIn,
    Mode,
    assert_unavailable,
    branch,
    no_node_left_active,
    node_of,
    post_upload,
    readiness,
    upload_sample,
    wait_nodes_ended,
    wait_not_ready,
    wait_ready,
    wait_stems_ended,
    wait_until,
)
from helpers import SAMPLE, child_processes
from probe import ffprobe

from sparrow.audio.canary import CANARY_TIMEOUT_S, FAILING_TRUSTED_S
from sparrow.domain.health import CACHE_S
from sparrow.media import MediaStore

pytestmark = pytest.mark.slow

# Hangs cost these, not the defaults (a minute).
TIMEOUTS = {"SPARROW_DECODE_TIMEOUT_S": "2", "SPARROW_EXPORT_TIMEOUT_S": "2"}
SLACK_S = 3.0  # a loaded two-core machine
# A fault shows once /readyz's cached answer expires and one canary has run (a hung
# FFmpeg's runs to its timeout). Its end shows once a failing canary answer, which may
# have started just before the fix, is no longer trusted, and /readyz's cache expires.
SHOWS_WITHIN_S = CACHE_S + CANARY_TIMEOUT_S + SLACK_S
CLEARS_WITHIN_S = CANARY_TIMEOUT_S + FAILING_TRUSTED_S + CACHE_S + SLACK_S

RATE, CHANNELS = 44_100, 2  # data/sample.flac
MPEG_FRAME = 1152
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}
CODECS = {"wav": "pcm_s16le", "flac": "flac", "mp3": "mp3"}


@dataclass
class Served:
    """The server under test, its FFmpeg stand-in, and where it keeps its files."""

    proc: subprocess.Popen[bytes]
    client: httpx.Client
    ffmpeg: FFmpegStandIn
    data_dir: Path
    media: MediaStore
    secrets: tuple[str, ...]  # server paths that no answer may show


@contextmanager
def served(tmp_path: Path) -> Iterator[Served]:
    standin = FFmpegStandIn(tmp_path / "ff")
    data_dir = tmp_path / "data"
    with (
        mock_server(
            data_dir,
            tmp_path / "server.log",
            "1",
            SPARROW_FFMPEG=str(standin.path),
            **TIMEOUTS,
        ) as (proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        secrets = (str(data_dir), str(standin.path.parent), str(tmp_path))
        yield Served(proc, client, standin, data_dir, MediaStore(data_dir), secrets)


def export(client: httpx.Client, chain_id: str, fmt: str) -> httpx.Response:
    return client.post(f"/api/chains/{chain_id}/export", json={"format": fmt, "crossfade_ms": 20})


def assert_exported(response: httpx.Response, fmt: str, frames: int, tmp_path: Path) -> None:
    """A 200 whose file ffprobe reads as the root alone: its rate, layout and length."""
    assert response.status_code == 200, (fmt, response.status_code, response.text)
    assert response.headers["content-type"] == MEDIA_TYPES[fmt]
    path = tmp_path / f"exported.{fmt}"
    path.write_bytes(response.content)
    stream = ffprobe(path)
    assert stream["codec_name"] == CODECS[fmt]
    assert (int(stream["sample_rate"]), stream["channels"]) == (RATE, CHANNELS)
    tolerance = MPEG_FRAME if fmt == "mp3" else 0
    assert abs(stream["decoded_samples"] - frames) <= tolerance, (fmt, stream["decoded_samples"])


def left_in(folder: Path) -> list[str]:
    """Everything under ``folder``, hidden names included ([] if it is not there)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_no_path(served_: Served, text: str) -> None:
    for secret in served_.secrets:
        assert secret not in text, text


@pytest.mark.parametrize("mode", ["fail", "hang", "empty", "garbage"])
def test_a_broken_ffmpeg_is_engine_unavailable_until_mended_then_the_server_recovers_by_itself(
    tmp_path: Path, mode: Mode
) -> None:
    # A hung run costs its timeout: one export format is enough to show it.
    formats = ["wav"] if mode == "hang" else ["wav", "flac", "mp3"]
    with served(tmp_path) as s:
        client = s.client
        chain_id, root = upload_sample(client)
        assert (root["sample_rate"], root["channels"]) == (RATE, CHANNELS)

        # -- the fault ------------------------------------------------------------------
        s.ffmpeg.set(mode)
        broke = time.monotonic()
        report = wait_not_ready(client, "ffmpeg", timeout_s=SHOWS_WITHIN_S)
        shown_s = time.monotonic() - broke
        assert report["status"] == "not_ready"
        assert {k: v for k, v in report["checks"].items() if k != "ffmpeg"} == {
            "database": True,
            "storage": True,
            "worker": True,
        }
        problem = report["problems"]["ffmpeg"]
        assert isinstance(problem, str) and problem.startswith("FFmpeg") and problem.endswith(".")
        assert_no_path(s, problem)

        refused = assert_unavailable(post_upload(client), "engine_unavailable")
        assert_no_path(s, refused["detail"])
        for fmt in formats:
            body = assert_unavailable(export(client, chain_id, fmt), "engine_unavailable")
            assert_no_path(s, body["detail"])
        # Nothing of the refused upload or of the refused exports is kept.
        assert client.get("/api/chains").json()["total"] == 1
        assert left_in(s.media.audio_dir) == sorted([chain_id, f"{chain_id}/{root['id']}.wav"]), (
            left_in(s.media.audio_dir)
        )
        assert left_in(s.media.chain_exports(chain_id)) == []
        assert left_in(s.media.tmp_dir) == []
        # What was acknowledged before is served all along (no FFmpeg needed).
        check_audio(client, node_of(client, root["id"]))

        # Work that reads stored audio through FFmpeg ends, with the same code. Work that
        # needs no conversion goes on: the root is at the stem engine's rate and layout,
        # so its stems are read from its WAV as it is.
        (failed_node,) = branch(client, root["id"])
        assert client.post(f"/api/nodes/{root['id']}/stems").status_code == 202
        (gone,) = wait_nodes_ended(client, [failed_node])
        assert gone["status"] == "error", gone
        assert gone["error"]["code"] == "engine_unavailable", gone
        assert_no_path(s, gone["error"]["detail"])
        made = wait_stems_ended(client, root["id"])
        assert made["status"] == "ready", made
        assert client.get(made["urls"]["drums"]).status_code == 200
        assert no_node_left_active(client, chain_id)

        # -- mended: the same process recovers by itself ---------------------------------
        s.ffmpeg.set("ok")
        mended = time.monotonic()
        wait_ready(client, timeout_s=CLEARS_WITHIN_S)
        cleared_s = time.monotonic() - mended
        status, report = readiness(client)
        assert status == 200 and report["problems"] == {}, report

        after_chain_id, after_root = upload_sample(client)
        assert after_root["frames"] == root["frames"]
        # The exports refused are made afresh, whole and correct: no garbage was cached.
        for fmt in formats:
            assert_exported(export(client, chain_id, fmt), fmt, root["frames"], tmp_path)
        assert not [n for n in left_in(s.media.chain_exports(chain_id)) if n.startswith(".")]

        (child,) = wait_nodes_ended(client, branch(client, root["id"]))
        assert child["status"] == "ready", child
        check_audio(client, child)
        assert client.post(f"/api/nodes/{after_root['id']}/stems").status_code == 202
        separated = wait_stems_ended(client, after_root["id"])
        assert separated["status"] == "ready", separated
        assert client.get(separated["urls"]["drums"]).status_code == 200

        # Nothing acknowledged is lost: both chains, their roots' audio, the ended node.
        listed = client.get("/api/chains").json()
        assert {c["id"] for c in listed["items"]} == {chain_id, after_chain_id}
        check_audio(client, node_of(client, root["id"]))
        check_audio(client, node_of(client, after_root["id"]))
        assert node_of(client, failed_node)["status"] == "error"
        assert left_in(s.media.tmp_dir) == []
        # Every FFmpeg the fault started has ended (a hung one was killed).
        wait_until(lambda: child_processes(s.proc.pid) == [], timeout_s=5, what="no FFmpeg left")
        assert s.proc.poll() is None, "the server must not have restarted"
    print(f"\n{mode}: /readyz showed the fault in {shown_s:.2f} s, cleared in {cleared_s:.2f} s")


def test_a_really_bad_upload_with_a_working_ffmpeg_is_still_the_clients_fault(
    tmp_path: Path,
) -> None:
    noise = np.random.default_rng(7).bytes(4000)
    cases = [
        ("random bytes", noise, 415, "unsupported_media"),
        ("a FLAC header, then garbage", b"fLaC" + noise, 422, "invalid_input"),
        ("a FLAC cut after its header", SAMPLE.read_bytes()[:120], 422, "invalid_input"),
    ]
    with served(tmp_path) as s:
        for what, content, status, code in cases:
            response = post_upload(s.client, content, name="clip.flac")
            assert response.status_code == status, (what, response.status_code, response.text)
            assert response.json()["error"] == code, (what, response.json())
            assert "retry-after" not in response.headers, what
            assert_no_path(s, response.json()["detail"])
        status_, report = readiness(s.client)
        assert status_ == 200 and report["checks"]["ffmpeg"] is True, report
        assert s.client.get("/api/chains").json()["total"] == 0
        assert left_in(s.media.audio_dir) == [] and left_in(s.media.tmp_dir) == []
        assert post_upload(s.client).status_code == 201
