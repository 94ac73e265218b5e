"""Branching through the API with the mock engine: the job queue, its limits and its outcomes."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers import (
    SAMPLE,
    branch,
    ml_installed,
    recorded_rows,
    services,
    upload,
    wait_for_status,
    worker_of,
)

from sparrow.api import create_app
from sparrow.audio import read_wav_info
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


async def new_root(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await upload(client, SAMPLE)
    assert response.status_code == 201
    root: dict[str, Any] = response.json()["root"]
    return root


async def audio_sha(client: httpx.AsyncClient, node_id: str) -> str:
    response = await client.get(f"/api/nodes/{node_id}/audio")
    assert response.status_code == 200
    return hashlib.sha256(response.content).hexdigest()


async def test_branch_generates_siblings_of_exact_duration(client: httpx.AsyncClient) -> None:
    root = await new_root(client)
    nodes = await branch(client, root["id"], count=3, duration_s=1.37, seed=40, prompt="lofi")
    assert [n["status"] for n in nodes] == ["queued"] * 3
    assert [n["params"]["seed"] for n in nodes] == [40, 41, 42]
    assert all(n["parent_id"] == root["id"] and n["kind"] == "continuation" for n in nodes)
    assert nodes[0]["params"] == {
        "duration_s": 1.37,
        "context_s": 10.0,
        "temperature": 1.0,
        "top_k": 250,
        "top_p": 0.0,
        "cfg_coef": 3.0,
        "match_loudness": True,
        "seed": 40,
        "engine": "mock",
        "model": "mock",
    }
    done = await wait_for_status(client, [n["id"] for n in nodes], "ready")
    for node in done:
        assert node["sample_rate"] == 32000
        assert node["frames"] == round(1.37 * 32000)
        assert node["duration_s"] == pytest.approx(1.37, abs=1 / 32000)
        assert node["prompt"] == "lofi" and not node["committed"]
    hashes = {await audio_sha(client, n["id"]) for n in done}
    assert len(hashes) == 3  # siblings differ


async def test_same_parent_params_and_seed_give_identical_audio(
    client: httpx.AsyncClient,
) -> None:
    root = await new_root(client)
    first = await branch(client, root["id"], count=2, duration_s=0.8, seed=7)
    again = await branch(client, root["id"], count=1, duration_s=0.8, seed=8)
    ids = [n["id"] for n in first + again]
    await wait_for_status(client, ids, "ready")
    shas = [await audio_sha(client, i) for i in ids]
    assert shas[1] == shas[2]  # seed 8, as a sibling and alone
    assert shas[0] != shas[1]


async def test_commit_a_branch_and_branch_again_from_it(client: httpx.AsyncClient) -> None:
    root = await new_root(client)
    nodes = await branch(client, root["id"], count=2, duration_s=0.5)
    await wait_for_status(client, [n["id"] for n in nodes], "ready")
    spine = (await client.post(f"/api/nodes/{nodes[1]['id']}/commit")).json()["spine"]
    assert [e["node"]["id"] for e in spine["nodes"]] == [root["id"], nodes[1]["id"]]
    grandchildren = await branch(client, nodes[1]["id"], count=1, duration_s=0.5, context_s=3)
    [done] = await wait_for_status(client, [grandchildren[0]["id"]], "ready")
    assert done["parent_id"] == nodes[1]["id"] and done["frames"] == 16000


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"duration_s": 0.4}, "duration_s"),
        ({"duration_s": 121}, "duration_s"),
        ({"count": 0}, "count"),
        ({"count": 9}, "count"),
        ({"context_s": 31}, "context_s"),
        ({"context_s": -1}, "context_s"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31 - 1, "count": 2}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"loudness": 3}, "loudness"),
        ({"duration_s": "long"}, "duration_s"),
        ({"count": True}, "count"),
        ({"count": "2"}, "count"),
        ({"cfg_coef": 0.5}, "cfg_coef"),
        ({"temperature": 1e-300}, "temperature"),
    ],
)
async def test_branch_rejects_out_of_range_params(
    client: httpx.AsyncClient, body: dict[str, Any], fragment: str
) -> None:
    root = await new_root(client)
    response = await client.post(f"/api/nodes/{root['id']}/branch", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_input"
    assert fragment in response.json()["detail"]


async def test_branch_rejects_nan_and_garbage_json(client: httpx.AsyncClient) -> None:
    root = await new_root(client)
    url = f"/api/nodes/{root['id']}/branch"
    headers = {"Content-Type": "application/json"}
    for raw in (b'{"duration_s": NaN}', b'{"duration_s": Infinity}', b"{nope", b"[]"):
        response = await client.post(url, content=raw, headers=headers)
        assert response.status_code == 422, (raw, response.text)


async def test_branch_needs_a_ready_parent(client: httpx.AsyncClient, app: FastAPI) -> None:
    root = await new_root(client)
    missing = await client.post("/api/nodes/0123/branch", json={})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    await worker_of(app).stop()  # nothing runs: the new node stays queued
    [queued] = await branch(client, root["id"], duration_s=1)
    conflict = await client.post(f"/api/nodes/{queued['id']}/branch", json={})
    assert conflict.status_code == 409 and "ready" in conflict.json()["detail"]


@pytest.fixture
def slow_settings(tmp_path: Path) -> Settings:
    # 50 ms per 20 ms frame: a 10 s branch takes 25 s, long enough to act on it. One job
    # at a time (SPARROW_MAX_BATCH=1), so that later ones wait in the queue.
    return Settings(
        data_dir=tmp_path / "data", engine="mock", mock_step_ms=50, queue_limit=2, max_batch=1
    )


@pytest.fixture
async def slow(slow_settings: Settings) -> Any:
    app = create_app(slow_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sparrow.test") as c:
            yield app, c


async def wait_running(client: httpx.AsyncClient, *, progress: float = 0.0) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = (await client.get("/api/gpu")).json()["running"]
        if running and running[0]["progress"] > progress:
            job: dict[str, Any] = running[0]
            return job
        await asyncio.sleep(0.02)
    raise AssertionError("no job started")


async def test_cancel_stops_the_running_batch_within_a_step(slow: Any) -> None:
    app, client = slow
    root = await new_root(client)
    nodes = await branch(client, root["id"], count=2, duration_s=10)
    ids = [n["id"] for n in nodes]
    job = await wait_running(client)
    assert sorted(job["node_ids"]) == sorted(ids)
    # Cancelling one sibling leaves the batch running for the other.
    first = await client.post(f"/api/nodes/{ids[0]}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    await asyncio.sleep(0.2)
    assert (await client.get("/api/gpu")).json()["running"][0]["node_ids"] == [ids[1]]
    started = time.monotonic()
    second = await client.post(f"/api/nodes/{ids[1]}/cancel")
    assert second.json()["status"] == "cancelled"
    while worker_of(app).running:
        assert time.monotonic() - started < 1.0, "the batch did not stop within a step"
        await asyncio.sleep(0.005)
    # Idempotent, and the nodes never get audio.
    assert (await client.post(f"/api/nodes/{ids[0]}/cancel")).status_code == 200
    assert (await client.get(f"/api/nodes/{ids[1]}/audio")).status_code == 409
    assert not list(services(app).media.chain_dir(root["chain_id"]).glob(f"{ids[1]}*"))


async def test_cancel_a_queued_node_and_refuse_to_cancel_a_ready_one(slow: Any) -> None:
    app, client = slow
    root = await new_root(client)
    [running] = await branch(client, root["id"], duration_s=10)
    [waiting] = await branch(client, root["id"], duration_s=10)
    await wait_running(client)
    cancelled = await client.post(f"/api/nodes/{waiting['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["error"] is None
    ready = await client.post(f"/api/nodes/{root['id']}/cancel")
    assert ready.status_code == 409 and ready.json()["error"] == "conflict"
    assert (await client.post("/api/nodes/nope/cancel")).status_code == 404
    await client.post(f"/api/nodes/{running['id']}/cancel")
    await wait_for_status(client, [running["id"]], "cancelled")
    # The cancelled queued job is skipped: nothing runs any more.
    deadline = time.monotonic() + 5
    while worker_of(app).running or ((await client.get("/api/gpu")).json()["queue_depth"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_full_queue_answers_429_with_retry_after(slow: Any) -> None:
    _, client = slow
    root = await new_root(client)
    await branch(client, root["id"], duration_s=10)
    await wait_running(client)
    await branch(client, root["id"], duration_s=10)
    await branch(client, root["id"], duration_s=10)  # queue_limit = 2 waiting
    refused = await client.post(f"/api/nodes/{root['id']}/branch", json={"duration_s": 10})
    assert refused.status_code == 429 and refused.json()["error"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    gpu = (await client.get("/api/gpu")).json()
    assert gpu["queue_depth"] == 2 and len(gpu["running"]) == 1


async def test_discarding_a_generating_node_stops_its_job(slow: Any) -> None:
    app, client = slow
    root = await new_root(client)
    [node] = await branch(client, root["id"], duration_s=10)
    await wait_running(client)
    response = await client.post(f"/api/nodes/{node['id']}/discard")
    assert response.json() == {"deleted": [node["id"]]}
    deadline = time.monotonic() + 1
    while worker_of(app).running:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    files = list(services(app).media.chain_dir(root["chain_id"]).iterdir())
    assert [f.stem for f in files] == [root["id"]]


async def test_deleting_the_chain_stops_its_job(slow: Any) -> None:
    app, client = slow
    root = await new_root(client)
    await branch(client, root["id"], duration_s=10)
    await wait_running(client)
    assert (await client.delete(f"/api/chains/{root['chain_id']}")).status_code == 204
    deadline = time.monotonic() + 1
    while worker_of(app).running:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert not services(app).media.chain_dir(root["chain_id"]).exists()
    assert (await client.get("/api/gpu")).json()["queue_depth"] == 0


async def test_queued_jobs_survive_a_restart_and_the_running_one_is_interrupted(
    slow_settings: Settings,
) -> None:
    app = create_app(slow_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            root = await new_root(client)
            [running] = await branch(client, root["id"], duration_s=10)
            waiting = await branch(client, root["id"], duration_s=0.5, count=2)
            await wait_running(client)
    # Shut down mid-job: the running node is interrupted, the queued ones wait.
    fast = slow_settings.model_copy(update={"mock_step_ms": 0.0})
    app = create_app(fast)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            interrupted = (await client.get(f"/api/nodes/{running['id']}")).json()
            assert interrupted["status"] == "error"
            assert interrupted["error"]["code"] == "interrupted"
            done = await wait_for_status(client, [n["id"] for n in waiting], "ready")
            assert [n["frames"] for n in done] == [16000, 16000]


async def test_an_engine_that_cannot_load_fails_the_job_not_the_worker(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "d", musicgen_model=str(tmp_path / "no-model"))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            root = await new_root(client)
            for _ in range(2):  # the worker carries on after a failure
                [node] = await branch(client, root["id"], duration_s=1)
                [failed] = await wait_for_status(client, [node["id"]], "error")
                assert failed["error"]["code"] == "engine_unavailable"
                # The folder that is not there, or (without the ml extra) what is missing.
                assert ("no-model" if ml_installed() else "torch") in failed["error"]["detail"]
            ready = await client.get("/readyz")
            assert ready.json()["checks"]["worker"] is True
            gpu = (await client.get("/api/gpu")).json()
            assert gpu["generation"]["engine"] == "musicgen"
            assert gpu["generation"]["loaded"] is False


async def test_gpu_reports_engine_and_queue(client: httpx.AsyncClient, app: FastAPI) -> None:
    gpu = (await client.get("/api/gpu")).json()
    mock = {"engine": "mock", "model": "mock", "device": "cpu", "dtype": None, "loaded": True}
    mock |= {"decoder": None, "decoder_check": None}
    assert gpu == {
        "generation": mock,
        "stems": {**mock, "model": gpu["stems"]["model"]},
        "vram_total_bytes": None,
        "vram_used_bytes": None,
        "queue_depth": 0,
        "running": [],
        "batch": {"max_rows": 8, "rows": []},
        "workers": [
            {
                # This server's own worker; on PostgreSQL it is registered under an id.
                "id": "local" if services(app).db.kind == "sqlite" else gpu["workers"][0]["id"],
                "host": socket.gethostname(),
                **{k: mock[k] for k in ("device", "engine", "model", "loaded")},
                "running": False,
            }
        ],
    }


async def test_generated_file_is_a_canonical_wav(client: httpx.AsyncClient, app: FastAPI) -> None:
    root = await new_root(client)
    [node] = await branch(client, root["id"], duration_s=0.75, seed=3)
    await wait_for_status(client, [node["id"]], "ready")
    path = services(app).media.node_audio(root["chain_id"], node["id"])
    info = read_wav_info(path)
    assert (info.sample_rate, info.channels, info.frames, info.bits) == (32000, 1, 24000, 16)
    head = await client.head(f"/api/nodes/{node['id']}/audio")
    assert head.headers["ETag"] == f'"{info.sha256}"'


async def test_cancelled_jobs_free_their_place_in_the_queue(slow: Any) -> None:
    _, client = slow
    root = await new_root(client)
    await branch(client, root["id"], duration_s=10)
    await wait_running(client)
    waiting = await branch(client, root["id"], duration_s=10, count=2)
    waiting += await branch(client, root["id"], duration_s=10)
    assert (await client.get("/api/gpu")).json()["queue_depth"] == 2  # the limit
    for node in waiting:
        assert (await client.post(f"/api/nodes/{node['id']}/cancel")).status_code == 200
    assert (await client.get("/api/gpu")).json()["queue_depth"] == 0
    await branch(client, root["id"], duration_s=10)  # room again: no 429


async def test_cancelling_other_nodes_never_touches_a_starting_job(app: FastAPI) -> None:
    from sparrow.jobs import JobControl
    from sparrow.models import Job, JobKind

    control = JobControl(Job("j", "c", JobKind.GENERATE, {}, "now"))
    control.forget(["someone-else"])  # before the job knows its nodes
    assert not control.cancel.is_set()
    control.node_ids.update({"a", "b"})
    control.forget(["b", "unrelated"])
    assert control.node_ids == {"a"} and not control.cancel.is_set()
    control.forget(["a"])
    assert control.cancel.is_set()


async def test_shutdown_does_not_wait_for_a_model_that_is_still_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparrow import services as services_module
    from sparrow.engines.mock import MockEngine

    class SlowToLoad(MockEngine):
        def load(self) -> None:
            time.sleep(20)  # a hub download, say

    monkeypatch.setattr(services_module, "build_engine", lambda settings: SlowToLoad())
    app = create_app(Settings(data_dir=tmp_path / "d", engine="mock"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            root = await new_root(client)
            [node] = await branch(client, root["id"], duration_s=1)
            await wait_for_status(client, [node["id"]], "generating")
            started = time.monotonic()
    assert time.monotonic() - started < 8  # the 5 s grace, not the 20 s load
    # The abandoned node is ended by the next start-up's recovery.
    app = create_app(Settings(data_dir=tmp_path / "d", engine="mock"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            [after] = await wait_for_status(client, [node["id"]], "error")
            assert after["error"]["code"] == "interrupted"


async def test_a_prompt_per_sibling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prompts``: one node per prompt, each node's prompt its own, and the engine gets one
    row per sibling with its text beside its seed."""
    app = create_app(Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=0))
    async with app.router.lifespan_context(app):
        asked = recorded_rows(services(app).generation.engine, monkeypatch)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            root = await new_root(client)
            prompts = ["warm pads", "a drum break", ""]
            nodes = await branch(client, root["id"], prompts=prompts, duration_s=0.5, seed=7)
            assert [n["prompt"] for n in nodes] == prompts
            assert [n["params"]["seed"] for n in nodes] == [7, 8, 9]
            await wait_for_status(client, [n["id"] for n in nodes], "ready")
            # count may be given when it agrees
            again = await branch(client, root["id"], prompts=["x", "y"], count=2, duration_s=0.5)
            assert [n["prompt"] for n in again] == ["x", "y"]
            await wait_for_status(client, [n["id"] for n in again], "ready")
    expected = list(zip(prompts, [7, 8, 9], strict=True))
    assert [(row.prompt, row.seed) for row in asked[:3]] == expected


@pytest.mark.parametrize(
    "body",
    [
        {"prompts": []},
        {"prompts": [f"p{i}" for i in range(9)]},  # more than SPARROW_MAX_COUNT (8)
        {"prompts": ["a", "b"], "prompt": "c"},
        {"prompts": ["a", "b"], "prompt": ""},
        {"prompts": ["a", "b"], "count": 3},
        {"prompts": ["a", 1]},
        {"prompts": ["a" * 2001]},
        {"prompts": "a"},
        {"prompts": None, "count": 2, "prompt": "x", "extra": 1},
    ],
)
async def test_bad_prompts_are_422_and_create_nothing(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    root = await new_root(client)
    response = await client.post(f"/api/nodes/{root['id']}/branch", json={"duration_s": 1, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_input"
    chain = (await client.get(f"/api/chains/{root['chain_id']}")).json()
    assert len(chain["nodes"]) == 1


async def test_requests_of_two_chains_decode_in_one_batch(tmp_path: Path) -> None:
    """Two branch requests on two chains run at once, their rows side by side in the
    batch, as /api/gpu shows: each node with its own job and progress."""
    settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=20)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first, second = await new_root(client), await new_root(client)
            [a] = await branch(client, first["id"], duration_s=4)
            [b] = await branch(client, second["id"], duration_s=4)
            for _ in range(500):
                gpu = (await client.get("/api/gpu")).json()
                rows = [r for r in gpu["batch"]["rows"] if r["decoding"]]
                if len(rows) == 2 and all(r["progress"] > 0 for r in rows):
                    break
                await asyncio.sleep(0.01)
            assert gpu["batch"]["max_rows"] == 8
            assert {r["node_id"] for r in rows} == {a["id"], b["id"]}
            assert len({r["job_id"] for r in rows}) == 2
            assert len(gpu["running"]) == 2 and gpu["workers"][0]["running"] is True
            await wait_for_status(client, [a["id"], b["id"]], "ready")
            assert (await client.get("/api/gpu")).json()["batch"]["rows"] == []
