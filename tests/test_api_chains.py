"""The chain and node routes, in-process, over a real database (SQLite, and PostgreSQL where
marked) and real audio files."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers import SAMPLE, add_child, both_databases, services, upload

from sparrow.api import create_app
from sparrow.audio import read_wav_info
from sparrow.domain import health
from sparrow.models import NodeStatus
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


async def make_chain(client: httpx.AsyncClient, title: str | None = None) -> dict[str, Any]:
    response = await upload(client, SAMPLE, title=title)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]


@both_databases
async def test_upload_creates_a_ready_committed_root(client: httpx.AsyncClient) -> None:
    body = await make_chain(client)
    chain, root = body["chain"], body["root"]
    assert isinstance(chain, dict) and isinstance(root, dict)
    assert chain["title"] == "sample"  # from the file name
    assert chain["root_node_id"] == root["id"]
    assert root["status"] == "ready" and root["committed"] is True
    assert root["kind"] == "upload" and root["parent_id"] is None
    assert root["sample_rate"] == 44100 and root["channels"] == 2
    assert root["frames"] == 8 * 44100
    assert root["duration_s"] == pytest.approx(8.0, abs=1e-9)
    assert root["params"] is None and root["error"] is None


@both_databases
async def test_list_newest_first_with_paging(client: httpx.AsyncClient) -> None:
    titles = ["one", "two", "three"]
    for title in titles:
        await make_chain(client, title)
    page = (await client.get("/api/chains", params={"limit": 2})).json()
    assert page["total"] == 3
    assert [c["title"] for c in page["items"]] == ["three", "two"]
    rest = (await client.get("/api/chains", params={"limit": 2, "offset": 2})).json()
    assert [c["title"] for c in rest["items"]] == ["one"] and rest["total"] == 3
    past = (await client.get("/api/chains", params={"offset": 5})).json()
    assert past == {"items": [], "total": 3}
    for params in ({}, {"limit": 3}, {"limit": 4, "offset": 1}):  # short, full, short
        assert (await client.get("/api/chains", params=params)).json()["total"] == 3, params
    assert_error(await client.get("/api/chains", params={"limit": 0}), 422, "invalid_input")
    assert_error(await client.get("/api/chains", params={"limit": "x"}), 422, "invalid_input")


@both_databases
async def test_get_rename_delete(client: httpx.AsyncClient, app: FastAPI) -> None:
    body = await make_chain(client)
    chain_id = body["chain"]["id"]
    got = (await client.get(f"/api/chains/{chain_id}")).json()
    assert [n["id"] for n in got["nodes"]] == [body["root"]["id"]]

    renamed = await client.patch(f"/api/chains/{chain_id}", json={"title": "  Night  drive "})
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Night drive"
    assert_error(
        await client.patch(f"/api/chains/{chain_id}", json={"title": ""}), 422, "invalid_input"
    )
    assert_error(await client.patch(f"/api/chains/{chain_id}", json={}), 422, "invalid_input")
    assert_error(
        await client.patch(
            f"/api/chains/{chain_id}",
            content=b"{nope",
            headers={"content-type": "application/json"},
        ),
        422,
        "invalid_input",
    )

    chain_dir = services(app).media.chain_dir(chain_id)
    assert chain_dir.is_dir()
    assert (await client.delete(f"/api/chains/{chain_id}")).status_code == 204
    assert not chain_dir.exists()
    assert_error(await client.get(f"/api/chains/{chain_id}"), 404, "not_found")
    assert_error(await client.delete(f"/api/chains/{chain_id}"), 404, "not_found")
    assert_error(await client.get(f"/api/nodes/{body['root']['id']}"), 404, "not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/api/chains/nope",
        "/api/chains/nope/spine",
        "/api/nodes/nope",
        "/api/nodes/nope/audio",
        "/api/nodes/nope/peaks",
        "/api/nodes/..%2F..%2Fetc%2Fpasswd/audio",
        "/api/nodes/" + "a" * 5000,
        "/api/no-such-route",
    ],
)
async def test_unknown_ids_are_404_json(client: httpx.AsyncClient, path: str) -> None:
    assert_error(await client.get(path), 404, "not_found")


@both_databases
async def test_spine_commit_uncommit_discard(client: httpx.AsyncClient, app: FastAPI) -> None:
    body = await make_chain(client)
    chain_id, root_id = body["chain"]["id"], body["root"]["id"]
    a = await add_child(app, root_id, seconds=1.0)
    b = await add_child(app, a.id, seconds=2.0)
    a2 = await add_child(app, root_id, seconds=0.5)
    queued = await add_child(app, a.id, status=NodeStatus.QUEUED)

    spine = (await client.get(f"/api/chains/{chain_id}/spine")).json()
    assert [e["node"]["id"] for e in spine["nodes"]] == [root_id]
    assert spine["duration_s"] == pytest.approx(8.0)

    before = (await client.get(f"/api/chains/{chain_id}")).json()["chain"]["updated_at"]
    committed = await client.post(f"/api/nodes/{b.id}/commit")
    assert committed.status_code == 200
    after = (await client.get(f"/api/chains/{chain_id}")).json()["chain"]["updated_at"]
    assert after > before  # the spine changed, so the chain did
    spine = committed.json()["spine"]
    assert [e["node"]["id"] for e in spine["nodes"]] == [root_id, a.id, b.id]
    assert [e["offset_s"] for e in spine["nodes"]] == pytest.approx([0.0, 8.0, 9.0])
    assert spine["duration_s"] == pytest.approx(11.0)
    # Idempotent.
    again = (await client.post(f"/api/nodes/{b.id}/commit")).json()["spine"]
    assert again == spine

    # Committing the other branch moves the spine off a and b.
    spine = (await client.post(f"/api/nodes/{a2.id}/commit")).json()["spine"]
    assert [e["node"]["id"] for e in spine["nodes"]] == [root_id, a2.id]
    assert (await client.get(f"/api/nodes/{b.id}")).json()["committed"] is False

    # Committing an ancestor keeps committed descendants.
    await client.post(f"/api/nodes/{b.id}/commit")
    spine = (await client.post(f"/api/nodes/{a.id}/commit")).json()["spine"]
    assert [e["node"]["id"] for e in spine["nodes"]] == [root_id, a.id, b.id]

    assert_error(await client.post(f"/api/nodes/{queued.id}/commit"), 409, "conflict")
    assert_error(await client.post(f"/api/nodes/{root_id}/uncommit"), 409, "conflict")
    assert_error(await client.post(f"/api/nodes/{root_id}/discard"), 409, "conflict")
    assert_error(await client.post(f"/api/nodes/{a.id}/discard"), 409, "conflict")

    spine = (await client.post(f"/api/nodes/{a.id}/uncommit")).json()["spine"]
    assert [e["node"]["id"] for e in spine["nodes"]] == [root_id]

    media = services(app).media
    assert media.node_audio(chain_id, b.id).exists()
    discarded = await client.post(f"/api/nodes/{a.id}/discard")
    assert discarded.status_code == 200
    assert discarded.json()["deleted"][0] == a.id
    assert set(discarded.json()["deleted"]) == {a.id, b.id, queued.id}
    assert not media.node_audio(chain_id, a.id).exists()
    assert not media.node_audio(chain_id, b.id).exists()
    nodes = (await client.get(f"/api/chains/{chain_id}")).json()["nodes"]
    assert {n["id"] for n in nodes} == {root_id, a2.id}


@both_databases
async def test_audio_range_etag_head(client: httpx.AsyncClient, app: FastAPI) -> None:
    body = await make_chain(client)
    root_id = body["root"]["id"]
    url = f"/api/nodes/{root_id}/audio"
    full = await client.get(url)
    assert full.status_code == 200
    assert full.headers["content-type"] == "audio/wav"
    assert full.headers["accept-ranges"] == "bytes"
    path = services(app).media.node_audio(body["chain"]["id"], root_id)
    assert full.content == path.read_bytes()
    assert read_wav_info(path).frames == 8 * 44100
    etag = full.headers["etag"]
    assert etag == f'"{hashlib.sha256(full.content).hexdigest()}"'
    size = len(full.content)

    part = await client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    tail = await client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == full.content[-10:]
    open_ended = await client.get(url, headers={"Range": f"bytes={size - 5}-"})
    assert open_ended.content == full.content[-5:]

    unsatisfiable = await client.get(url, headers={"Range": f"bytes={size + 10}-"})
    assert_error(unsatisfiable, 416, "range_not_satisfiable")
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    malformed = await client.get(url, headers={"Range": "bytes=abc"})
    assert malformed.status_code == 200 and len(malformed.content) == size

    cached = await client.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert (await client.get(url, headers={"If-None-Match": '"other"'})).status_code == 200

    head = await client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size
    assert head.headers["etag"] == etag


async def test_audio_of_a_node_that_is_not_ready_is_409(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    body = await make_chain(client)
    queued = await add_child(app, body["root"]["id"], status=NodeStatus.QUEUED)
    assert_error(await client.get(f"/api/nodes/{queued.id}/audio"), 409, "conflict")
    assert_error(await client.get(f"/api/nodes/{queued.id}/peaks"), 409, "conflict")


async def test_peaks(client: httpx.AsyncClient) -> None:
    body = await make_chain(client)
    url = f"/api/nodes/{body['root']['id']}/peaks"
    default = await client.get(url)
    assert default.status_code == 200
    peaks = default.json()
    assert peaks["version"] == 2 and peaks["bits"] == 8
    assert peaks["channels"] == 1 and peaks["sample_rate"] == 44100
    assert peaks["samples_per_pixel"] == 256
    assert peaks["length"] == -(-8 * 44100 // 256)
    assert len(peaks["data"]) == 2 * peaks["length"]
    assert all(-128 <= v <= 127 for v in peaks["data"])
    assert max(peaks["data"]) > 40  # the sample clip is not silence

    split = (
        await client.get(url, params={"pixels_per_second": 10, "split_channels": "true"})
    ).json()
    assert split["channels"] == 2 and split["samples_per_pixel"] == 4410
    assert split["length"] == 80 and len(split["data"]) == 80 * 2 * 2

    cached = await client.get(url, headers={"If-None-Match": default.headers["etag"]})
    assert cached.status_code == 304

    both = {"pixels_per_second": 10, "samples_per_pixel": 100}
    assert_error(await client.get(url, params=both), 422, "invalid_input")
    assert_error(await client.get(url, params={"samples_per_pixel": 1}), 422, "invalid_input")
    assert_error(await client.get(url, params={"pixels_per_second": -1}), 422, "invalid_input")
    for pps in ("nan", "1e-14", "0", "2.5", "inf"):
        response = await client.get(url, params={"pixels_per_second": pps})
        assert_error(response, 422, "invalid_input")
    assert_error(await client.get(url, params={"samples_per_pixel": 2**25}), 422, "invalid_input")
    rounded = (await client.get(url, params={"pixels_per_second": 29})).json()
    assert rounded["samples_per_pixel"] == 44100 // 29  # audiowaveform rounds down


@both_databases
async def test_health_and_readiness(client: httpx.AsyncClient, app: FastAPI) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await services(app).db.close()
    await asyncio.sleep(health.CACHE_S)  # the last answer is kept that long
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    body = not_ready.json()
    assert body["status"] == "not_ready"
    assert body["checks"] == {"database": False, "storage": True, "ffmpeg": True, "worker": True}
    assert body["problems"] == {"database": "The database is not open."}


async def test_missing_ffmpeg_is_503_not_a_client_error(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, ffmpeg=str(tmp_path / "no-such-ffmpeg")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            checks = ready.json()["checks"]
            assert checks == {"database": True, "storage": True, "ffmpeg": False, "worker": True}
            assert_error(await upload(client, SAMPLE), 503, "engine_unavailable")
            assert (await client.get("/api/chains")).json()["total"] == 0


async def test_method_not_allowed_is_json(client: httpx.AsyncClient) -> None:
    assert_error(await client.put("/api/chains"), 405, "method_not_allowed")


async def test_openapi_documents_every_route_and_error(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    operations = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    expected = {
        ("POST", "/api/chains"),
        ("GET", "/api/chains"),
        ("GET", "/api/chains/{chain_id}"),
        ("PATCH", "/api/chains/{chain_id}"),
        ("DELETE", "/api/chains/{chain_id}"),
        ("GET", "/api/chains/{chain_id}/spine"),
        ("GET", "/api/nodes/{node_id}"),
        ("POST", "/api/nodes/{node_id}/commit"),
        ("POST", "/api/nodes/{node_id}/uncommit"),
        ("POST", "/api/nodes/{node_id}/discard"),
        ("GET", "/api/nodes/{node_id}/audio"),
        ("HEAD", "/api/nodes/{node_id}/audio"),
        ("GET", "/api/nodes/{node_id}/peaks"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    }
    assert expected <= set(operations)
    for (method, path), op in operations.items():
        if "{" in path:
            assert "404" in op["responses"], f"{method} {path} does not document its 404"
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and path.startswith("/api"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)
    upload_body = operations[("POST", "/api/chains")]["requestBody"]["content"]
    assert "file" in upload_body["multipart/form-data"]["schema"]["properties"]
    assert set(operations[("POST", "/api/chains")]["responses"]) == {
        "201", "401", "408", "413", "415", "422", "429", "503",
    }  # fmt: skip


async def test_cors_in_development_allows_any_origin_without_credentials(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/chains", headers={"Origin": "http://localhost:5173"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


@both_databases
async def test_commit_racing_discard_never_breaks_the_spine(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    """Either the commit wins (the discard is then a 409) or the discard does (404)."""
    body = await make_chain(client)
    chain_id, root_id = body["chain"]["id"], body["root"]["id"]
    pairs = []
    for _ in range(40):
        x = await add_child(app, root_id, seconds=0.1)
        pairs.append((x, await add_child(app, x.id, seconds=0.1)))

    for x, y in pairs:
        commit, discard = await asyncio.gather(
            client.post(f"/api/nodes/{y.id}/commit"), client.post(f"/api/nodes/{x.id}/discard")
        )
        outcome = (commit.status_code, discard.status_code)
        assert outcome in {(200, 409), (404, 200)}, outcome
        spine = (await client.get(f"/api/chains/{chain_id}/spine")).json()["nodes"]
        ids = [e["node"]["id"] for e in spine]
        assert ids in ([root_id], [root_id, x.id, y.id])
        if ids != [root_id]:
            await client.post(f"/api/nodes/{x.id}/uncommit")
