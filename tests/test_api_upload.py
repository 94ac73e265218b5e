"""Uploads through the HTTP API: every format, the hostile corpus, and the size limit.

The files come from ``corpus`` (built with numpy and FFmpeg by the tests); each
case states the status the API must answer. After every bad upload the server
must still be healthy and must have left no file behind.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from corpus import BAD_NAMES, GOOD_NAMES, BadUpload, GoodUpload
from fastapi import FastAPI
from helpers import services, upload
from live import read_status, running_server

from sparrow.api import create_app
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # 2 s: the corpus's over-duration case is 3 s long; every other case is shorter.
    return Settings(data_dir=tmp_path / "data", max_upload_s=2.0)


def leftover_files(app: FastAPI) -> list[Path]:
    media = services(app).media
    return [p for d in (media.tmp_dir, media.audio_dir) for p in d.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", GOOD_NAMES)
async def test_every_format_is_accepted(
    client: httpx.AsyncClient, good_uploads: dict[str, GoodUpload], name: str
) -> None:
    case = good_uploads[name]
    response = await upload(client, case.path)
    assert response.status_code == 201, response.text
    root = response.json()["root"]
    assert root["sample_rate"] == case.sample_rate
    assert root["channels"] == case.channels
    assert root["duration_s"] == pytest.approx(case.duration_s, abs=case.tolerance_s + 1e-9)
    if case.frames is not None:
        assert root["frames"] == case.frames
    audio = await client.get(f"/api/nodes/{root['id']}/audio")
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF"


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_input_gets_its_documented_status(
    client: httpx.AsyncClient, app: FastAPI, bad_uploads: dict[str, BadUpload], name: str
) -> None:
    case = bad_uploads[name]
    response = await upload(client, case.path, filename=case.path.name)
    assert response.status_code == case.status, f"{case.why}: {response.text}"
    if case.code is not None:
        assert response.json()["error"] == case.code
        assert response.json()["detail"]
        assert leftover_files(app) == []
        assert (await client.get("/api/chains")).json()["total"] == 0
    assert (await client.get("/readyz")).status_code == 200


async def test_mp3_named_flac_is_decoded_as_mp3(
    client: httpx.AsyncClient, good_uploads: dict[str, GoodUpload]
) -> None:
    case = good_uploads["mp3_named_flac"]
    response = await upload(client, case.path, filename="take-1.flac")
    assert response.status_code == 201
    assert response.json()["chain"]["title"] == "take-1"


async def test_form_errors(client: httpx.AsyncClient, good_uploads: dict[str, GoodUpload]) -> None:
    wav = good_uploads["wav_s16_44k_stereo"].path.read_bytes()
    no_file = await client.post("/api/chains", data={"title": "x"}, files={"other": ("a", b"1")})
    assert no_file.status_code == 422 and no_file.json()["error"] == "invalid_input"
    not_multipart = await client.post("/api/chains", content=wav)
    assert not_multipart.status_code == 422
    garbage = await client.post(
        "/api/chains",
        content=b"--xyz\r\nnonsense",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert garbage.status_code == 422
    two_files = await client.post(
        "/api/chains", files=[("file", ("a.wav", wav)), ("file", ("b.wav", wav))]
    )
    assert two_files.status_code == 422
    titled = await client.post(
        "/api/chains", files={"file": ("a.wav", wav)}, data={"title": "My\x00 riff\n"}
    )
    assert titled.status_code == 201 and titled.json()["chain"]["title"] == "My riff"


@pytest.fixture
async def small_limit_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(Settings(data_dir=tmp_path / "small", max_upload_mb=0.05))
    async with app.router.lifespan_context(app):
        yield app


async def test_over_the_size_limit_is_413(
    small_limit_app: FastAPI, good_uploads: dict[str, GoodUpload]
) -> None:
    transport = httpx.ASGITransport(app=small_limit_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
        big = good_uploads["wav_s16_44k_stereo"].path  # 1.5 s of 44.1 kHz stereo: 265 kB
        response = await upload(client, big)
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            # No Content-Length: the limit is enforced while counting the streamed bytes.
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            for _ in range(100):
                yield b"\0" * 10_000
            yield b"\r\n--b--\r\n"

        response = await client.post(
            "/api/chains",
            content=chunked(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert response.status_code == 413
        assert leftover_files(small_limit_app) == []


def test_413_arrives_before_the_body_is_sent(tmp_path: Path) -> None:
    """Over a real socket: the answer comes while the client still holds most of the body."""
    settings = Settings(data_dir=tmp_path / "data", max_upload_mb=1)
    with running_server(settings) as base:
        port = int(base.rsplit(":", 1)[1])
        preamble = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'

        # A Content-Length over the limit: refused before any of the body is read.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /api/chains HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 10000000000\r\n\r\n" + preamble
            )
            started = time.monotonic()
            assert read_status(sock, 5) == 413
            assert time.monotonic() - started < 5

        # Chunked, no length: refused once 1 MB has streamed in, not at the end of the body.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /api/chains HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"\0" * 65536
            sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
            for _ in range(20):  # 1.3 MB of an endless body, then we stop sending
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert read_status(sock, 5) == 413

        with httpx.Client(base_url=base) as client:
            assert client.get("/readyz").status_code == 200
