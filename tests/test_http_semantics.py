"""HTTP details a professional client relies on: HEAD, Allow, body limits, CORS refusals,
and JSON answers to requests the HTTP parser refuses."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from corpus import GoodUpload
from fastapi import FastAPI
from helpers import SAMPLE, upload
from live import running_server
from opentelemetry import trace

from sparrow.api import create_app
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


async def test_head_works_wherever_get_does(client: httpx.AsyncClient) -> None:
    created = await upload(client, SAMPLE)
    chain_id = created.json()["chain"]["id"]
    for path in ("/healthz", "/readyz", "/api/chains", f"/api/chains/{chain_id}/spine"):
        get, head = await client.get(path), await client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"]
    assert (await client.head("/api/chains/nope")).status_code == 404


async def test_405_names_every_allowed_method(client: httpx.AsyncClient) -> None:
    response = await client.request("PUT", "/api/chains")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert response.json()["error"] == "method_not_allowed"
    response = await client.request("POST", "/api/chains/abc")
    assert response.headers["allow"] == "DELETE, GET, HEAD, PATCH"


async def test_created_chain_has_a_location(client: httpx.AsyncClient) -> None:
    response = await upload(client, SAMPLE)
    assert response.headers["location"] == f"/api/chains/{response.json()['chain']['id']}"


async def test_json_bodies_are_bounded(client: httpx.AsyncClient) -> None:
    created = (await upload(client, SAMPLE)).json()
    url = f"/api/chains/{created['chain']['id']}"
    huge = b'{"title": "' + b"x" * 200_000 + b'"}'
    response = await client.patch(url, content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert response.headers["connection"] == "close"

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"title": "'
        for _ in range(20):
            yield b"x" * 10_000
        yield b'"}'

    response = await client.patch(
        url, content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    ok = await client.patch(url, json={"title": "fine"})
    assert ok.status_code == 200


async def test_incomplete_multipart_body_is_refused(
    client: httpx.AsyncClient, good_uploads: dict[str, GoodUpload]
) -> None:
    wav = good_uploads["wav_s16_44k_stereo"].path.read_bytes()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + wav[: len(wav) // 2]
    )  # no closing boundary: the client was cut off
    response = await client.post(
        "/api/chains", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422
    assert "incomplete" in response.json()["detail"]
    assert (await client.get("/api/chains")).json()["total"] == 0


async def test_unknown_field_gets_a_helpful_message(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chains", files={"audio": ("a.wav", SAMPLE.read_bytes())})
    assert response.status_code == 422
    assert "field named 'file'" in response.json()["detail"]


@pytest.fixture
async def strict_cors_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(Settings(data_dir=tmp_path, cors_origins="https://editor.example"))
    async with app.router.lifespan_context(app):
        yield app


async def test_refused_cors_preflight_is_json(strict_cors_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=strict_cors_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
        response = await client.options(
            "/api/chains",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
        )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_input"
    assert "origin" in response.json()["detail"].lower()


@pytest.fixture
async def one_upload_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = Settings(data_dir=tmp_path, max_concurrent_uploads=1, upload_idle_timeout_s=0.5)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


async def test_stalled_upload_times_out_and_extra_uploads_get_429(
    one_upload_app: FastAPI,
) -> None:
    transport = httpx.ASGITransport(app=one_upload_app)
    slots = one_upload_app.state.services.uploads
    release = anyio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nRIFF'
        await release.wait()  # nothing more until the test ends: the server must give up
        yield b""

    async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
        done = anyio.Event()
        results: dict[str, httpx.Response] = {}

        async def first() -> None:
            results["stalled"] = await client.post(
                "/api/chains",
                content=stalled(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(10):
                while slots.in_use == 0:  # noqa: ASYNC110 - polling another task's state
                    await anyio.sleep(0.01)
            second = await upload(client, SAMPLE)
            assert second.status_code == 429
            assert second.headers["retry-after"] == "2"
            with anyio.fail_after(10):
                await done.wait()
            release.set()
        assert results["stalled"].status_code == 408, results["stalled"].text
        assert results["stalled"].json()["error"] == "request_timeout"
        assert slots.in_use == 0
        assert (await upload(client, SAMPLE)).status_code == 201
        assert list(one_upload_app.state.services.media.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        # 10,000 ETags, as a client replaying its whole cache would send.
        (b"If-None-Match: " + b",".join(b'"%064d"' % i for i in range(10_000)), 431, None),
        (b"Last-Event-ID: " + b"1" * 1_000_000, 431, None),
        (b"A header line without a colon", 400, "invalid_input"),
    ],
    ids=["10k-etags", "1mb-last-event-id", "malformed"],
)
def test_requests_uvicorn_cannot_parse_get_the_apis_json_error(
    tmp_path: Path, header: bytes, status: int, code: str | None
) -> None:
    """Over a real socket: such a request never reaches the app, yet the answer is the
    API's ``{"error", "detail"}`` and arrives whole, though the rest of the request is
    still being sent."""
    settings = Settings(data_dir=tmp_path / "d", engine="mock")
    with running_server(settings) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            request = b"GET /api/chains HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n\r\n"
            sender = threading.Thread(target=sock.sendall, args=(request,), daemon=True)
            sender.start()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            sender.join(10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == str(status).encode(), head
        assert b"content-type: application/json" in head.lower()
        error = json.loads(body)
        assert error["error"] == (code or "headers_too_large") and error["detail"]
        # The server goes on serving.
        assert httpx.get(f"{base}/api/chains").status_code == 200


class _AskedProvider(trace.TracerProvider):
    """An OpenTelemetry tracer provider that records whether anyone asked it for a tracer."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def get_tracer(
        self, instrumenting_module_name: str, *args: object, **kwargs: object
    ) -> trace.Tracer:
        self.asked.append(instrumenting_module_name)
        return trace.NoOpTracer()


@pytest.mark.parametrize("telemetry", ["off", "on"])
async def test_telemetry_reaches_a_configured_sdk_only_when_on(
    telemetry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _AskedProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    app = create_app(Settings(data_dir=tmp_path, engine="mock", telemetry=telemetry))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
            assert (await client.get("/api/chains")).status_code == 200
    assert bool(provider.asked) == (telemetry == "on")
