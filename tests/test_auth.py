"""API keys and ownership (SPEC §8): the CLI, 401s, and the ownership matrix.

The matrix walks every route in the OpenAPI document that takes an id, so a
route added later is covered without touching this file: key B must get 404 on each of
key A's resources, learn nothing of A's data, and change nothing of it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from helpers import SAMPLE, add_child, authed_app, bearer, services
from live import sparrow_cli

from sparrow.api import create_app
from sparrow.domain.keys import _stream_mac, hash_key
from sparrow.models import Tier
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


async def test_keys_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    data = tmp_path / "d"
    created = sparrow_cli(data, "keys", "create", "--tier", "paid", "--name", "Studio A")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sk_[A-Za-z0-9_-]{43}", key)  # 256 random bits
    free = sparrow_cli(data, "keys", "create", "--tier", "free").stdout.strip().splitlines()[-1]
    assert free != key
    database = b"".join(p.read_bytes() for p in data.glob("sparrow.db*"))
    assert key.encode() not in database and free.encode() not in database
    assert hash_key(key).encode() in database

    listed = sparrow_cli(data, "keys", "list").stdout
    assert "Studio A" in listed and "paid" in listed and key not in listed
    key_id = next(line.split()[0] for line in listed.splitlines() if "Studio A" in line)

    app = create_app(Settings(data_dir=data, engine="mock", auth="on"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.get("/api/chains", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
            # In a thread: the app's loop keeps running (a write it has begun can commit)
            # while the other process waits for the database.
            tiered = await anyio.to_thread.run_sync(
                sparrow_cli, data, "keys", "set-tier", key_id, "free"
            )
            assert tiered.returncode == 0, tiered.stderr
            caller = await services(app).keys.caller(key)
            assert caller.tier is Tier.FREE
            revoked = await anyio.to_thread.run_sync(sparrow_cli, data, "keys", "revoke", key_id)
            assert revoked.returncode == 0, revoked.stderr
            gone = await client.get("/api/chains", headers={"Authorization": f"Bearer {key}"})
            assert gone.status_code == 401
    missing = sparrow_cli(data, "keys", "revoke", "no-such-key")
    assert missing.returncode == 1 and "no key" in missing.stderr
    bad = sparrow_cli(data, "keys", "create", "--tier", "gold")
    assert bad.returncode == 2


@pytest.fixture
async def authed(
    tmp_path: Path,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    async with authed_app(tmp_path, {"a": Tier.PAID, "b": Tier.PAID}, mock_step_ms=1) as running:
        yield running


async def test_requests_without_a_valid_key_get_401(
    authed: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, tokens = authed
    for headers in (
        {},
        {"Authorization": "Bearer sk_not-a-key"},
        {"Authorization": f"Basic {tokens['a']}"},
        {"Authorization": "Bearer"},
        {"Authorization": tokens["a"]},
    ):
        for method, path in [("GET", "/api/chains"), ("GET", "/api/gpu"), ("POST", "/api/chains")]:
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status_code == 200  # no key needed
    assert (await client.get("/api/chains", headers=bearer(tokens["a"]))).status_code == 200


def test_every_api_operation_reads_the_caller_as_its_document_says(tmp_path: Path) -> None:
    """The document lists the bearer scheme on every /api operation (auth on), and every
    /api route does read its caller, from a key or, for an event stream, a stream token
    (the polled reads through ``get_chain_reads``, which calls ``get_caller``)."""
    from fastapi.routing import APIRoute

    from sparrow.api.deps import get_caller, get_chain_reads, get_stream_caller

    def calls(dependant: Any) -> set[Any]:
        return {dependant.call} | {c for d in dependant.dependencies for c in calls(d)}

    app = create_app(Settings(data_dir=tmp_path, engine="mock", auth="on"))
    api = [r for r in app.routes if isinstance(r, APIRoute) and r.path.startswith("/api/")]
    assert len(api) > 20
    for route in api:
        assert calls(route.dependant) & {get_caller, get_chain_reads, get_stream_caller}, route.path
    document = app.openapi()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for operation in operations.values():
            wanted: list[dict[str, list[str]]] | None = (
                [{"HTTPBearer": []}] if path.startswith("/api/") else None
            )
            assert operation.get("security") == wanted, path


async def test_auth_off_needs_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/chains")).status_code == 200
    ignored = await client.get("/api/chains", headers={"Authorization": "Bearer whatever"})
    assert ignored.status_code == 200


async def _id_routes(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """Every (method, path) of the API that takes an id, as its OpenAPI document lists them."""
    doc = (await client.get("/openapi.json")).json()
    return [
        (method.upper(), path)
        for path, operations in doc["paths"].items()
        if "{" in path
        for method in operations
    ]


_BODIES: dict[str, dict[str, Any]] = {
    "/api/nodes/{parent_id}/branch": {"duration_s": 1},
    "/api/chains/{chain_id}/export": {},
    "/api/chains/{chain_id}": {"title": "taken over"},
}


async def test_ownership_matrix(
    authed: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, tokens = authed
    a, b = bearer(tokens["a"]), bearer(tokens["b"])
    response = await client.post(
        "/api/chains",
        files={"file": ("mine.flac", SAMPLE.read_bytes())},
        data={"title": "A's secret song"},
        headers=a,
    )
    created = response.json()
    chain_id, root_id = created["chain"]["id"], created["root"]["id"]
    child = await add_child(app, root_id, seconds=1.0)
    assert (await client.post(f"/api/nodes/{child.id}/commit", headers=a)).status_code == 200
    assert (await client.post(f"/api/chains/{chain_id}/stems", headers=a)).status_code == 202
    for _ in range(500):
        if (await client.get(f"/api/chains/{chain_id}/stems", headers=a)).json()["ready"]:
            break
        await asyncio.sleep(0.01)
    assert (await client.post(f"/api/chains/{chain_id}/export", headers=a, json={})).is_success
    before = (await client.get(f"/api/chains/{chain_id}", headers=a)).json()
    secrets = {chain_id, root_id, child.id, "A's secret song"}

    values = {"chain_id": chain_id, "node_id": child.id, "parent_id": child.id, "stem": "drums"}
    routes = await _id_routes(client)
    assert len(routes) >= 20
    for method, path in routes:
        url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
        body = _BODIES.get(path) if method in ("POST", "PATCH") else None
        response = await client.request(method, url, headers=b, json=body)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        if method != "HEAD":
            assert response.json()["error"] == "not_found"
        asked = set(re.findall(r"[0-9a-f]{32}", url))
        leaked = {s for s in secrets - asked if s in response.text}
        assert not leaked, (method, path, leaked)

    # Nothing of A's changed, and A still reaches all of it.
    assert (await client.get(f"/api/chains/{chain_id}", headers=a)).json() == before
    for method, path in routes:
        if method != "GET" or path.endswith("/events"):
            continue  # writes were checked above; the stream is endless
        url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
        response = await client.get(url, headers=a)
        assert response.status_code == 200, (path, response.text)

    # Lists and the queue show B nothing of A's.
    listed = (await client.get("/api/chains", headers=b)).json()
    assert listed == {"items": [], "total": 0}
    assert (await client.get("/api/chains", headers=a)).json()["total"] == 1
    long = await client.post(f"/api/nodes/{root_id}/branch", headers=a, json={"duration_s": 30})
    for _ in range(500):
        if (await client.get("/api/gpu", headers=a)).json()["running"]:
            break
        await asyncio.sleep(0.01)
    seen_by_b = (await client.get("/api/gpu", headers=b)).text
    assert json.loads(seen_by_b)["running"] == []
    assert json.loads(seen_by_b)["batch"]["rows"] == []  # A's rows are A's to see
    assert not any(s in seen_by_b for s in secrets | {long.json()["nodes"][0]["id"]})


async def test_queue_limit_per_key(tmp_path: Path) -> None:
    settings = Settings(  # one job at a time: the others wait, and count
        data_dir=tmp_path / "d",
        engine="mock",
        auth="on",
        mock_step_ms=5,
        queue_limit_per_owner=2,
        max_batch=1,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        keys = services(app).keys
        a = bearer((await keys.create(tier=Tier.PAID))[1])
        b = bearer((await keys.create(tier=Tier.PAID))[1])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            roots = {}
            for name, headers in (("a", a), ("b", b)):
                created = await client.post(
                    "/api/chains", files={"file": ("x.flac", SAMPLE.read_bytes())}, headers=headers
                )
                roots[name] = created.json()["root"]["id"]

            async def branch_a() -> httpx.Response:
                return await client.post(
                    f"/api/nodes/{roots['a']}/branch", headers=a, json={"duration_s": 20}
                )

            assert (await branch_a()).status_code == 202
            for _ in range(500):
                if (await client.get("/api/gpu", headers=a)).json()["running"]:
                    break
                await asyncio.sleep(0.01)
            # One running and two waiting, then A's share is full.
            assert [(await branch_a()).status_code for _ in range(2)] == [202, 202]
            refused = await branch_a()
            assert refused.status_code == 429
            assert "per key" in refused.json()["detail"] and "Retry-After" in refused.headers
            other = await client.post(
                f"/api/nodes/{roots['b']}/branch", headers=b, json={"duration_s": 1}
            )
            assert other.status_code == 202  # B has its own share


async def test_stream_tokens_open_one_chain_stream_only(
    authed: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, tokens = authed
    a = bearer(tokens["a"])
    chains = []
    for _ in range(2):
        created = await client.post(
            "/api/chains", files={"file": ("x.flac", SAMPLE.read_bytes())}, headers=a
        )
        chains.append(created.json()["chain"]["id"])
    issued = (await client.post(f"/api/chains/{chains[0]}/stream-token", headers=a)).json()
    assert issued["expires_in_s"] == 300
    token = issued["token"]
    keys = services(app).keys
    caller = await keys.stream_caller(token, chains[0])
    assert caller == await keys.caller(tokens["a"])  # the key's owner and tier

    async def stream_status(chain_id: str, value: str) -> int:
        response = await client.get(f"/api/chains/{chain_id}/events", params={"token": value})
        return response.status_code

    key_id, expiry, mac = token.split(".")
    forged = f"{key_id}.{int(expiry) + 3600}.{mac}"  # a longer life, same signature
    found = await keys.keys.with_hash(key_id)
    assert found is not None
    past = int(time.time()) - 1  # well signed, but expired
    stale = f"{key_id}.{past}.{_stream_mac(found[1], key_id, chains[0], past)}"
    for chain_id, value in [
        (chains[1], token),  # another chain of the same key
        (chains[0], forged),
        (chains[0], stale),
        (chains[0], token[:-2]),
        (chains[0], "garbage"),
        (chains[0], "a" * 70 + ".1.x"),
    ]:
        assert await stream_status(chain_id, value) == 401, value
    # Not a key: no other route takes it.
    other = await client.get(f"/api/chains/{chains[0]}", params={"token": token})
    assert other.status_code == 401
    # Another key cannot have one for A's chain, and a revoked key's tokens die with it.
    b = bearer(tokens["b"])
    assert (
        await client.post(f"/api/chains/{chains[0]}/stream-token", headers=b)
    ).status_code == 404
    await keys.revoke(key_id)
    assert await stream_status(chains[0], token) == 401


async def test_no_stream_token_is_needed_with_auth_off(client: httpx.AsyncClient) -> None:
    chain_id = (
        await client.post("/api/chains", files={"file": ("x.flac", SAMPLE.read_bytes())})
    ).json()["chain"]["id"]
    issued = await client.post(f"/api/chains/{chain_id}/stream-token")
    assert issued.json() == {"token": None, "expires_in_s": None}
