"""Stems through the API: queue, progress, cancel, files, tiers, and the spine's stems.

Most tests use the mock stem engine (the same decode and publish path as Demucs);
``test_stems_through_demucs_with_a_paid_key`` runs the real demucs code on the
tiny local HTDemucs, behind auth, with a paid key.
"""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from helpers import SAMPLE, add_child, authed_app, bearer, services, upload, worker_of

from sparrow.api import create_app
from sparrow.audio import read_wav
from sparrow.models import Job, JobKind, NodeStatus, StemsStatus, Tier, new_id, utc_now
from sparrow.settings import Settings

if TYPE_CHECKING:
    from sparrow.engines.tiny import TinyModels

pytestmark = pytest.mark.anyio

STEMS = ["drums", "bass", "other", "vocals"]
STEM_RATE = 44_100


async def wait_stems(
    client: httpx.AsyncClient, node_id: str, *statuses: str, timeout_s: float = 30
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body: dict[str, Any] = (await client.get(f"/api/nodes/{node_id}/stems")).json()
        if body.get("status") in statuses:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.02)


def wav_frames(data: bytes) -> tuple[int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


@pytest.fixture
async def chain(client: httpx.AsyncClient, app: FastAPI) -> dict[str, Any]:
    """A 44.1 kHz stereo root and a committed 1.25 s mono 32 kHz continuation."""
    created = (await upload(client, SAMPLE)).json()
    child = await add_child(app, created["root"]["id"], seconds=1.25)
    assert (await client.post(f"/api/nodes/{child.id}/commit")).status_code == 200
    return {"chain_id": created["chain"]["id"], "root": created["root"], "child": child}


async def test_node_stems_are_four_wavs_of_the_node_duration(
    client: httpx.AsyncClient, chain: dict[str, Any]
) -> None:
    child = chain["child"]
    first = await client.post(f"/api/nodes/{child.id}/stems")
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "queued" and first.json()["urls"] == {}
    done = await wait_stems(client, child.id, "ready")
    frames = round(child.frames * STEM_RATE / child.sample_rate)
    assert (done["sample_rate"], done["channels"], done["frames"]) == (STEM_RATE, 2, frames)
    assert done["progress"] == 1.0 and done["model"] == "mock"
    assert sorted(done["urls"]) == sorted(STEMS)
    mixes = []
    for stem in STEMS:
        response = await client.get(done["urls"][stem])
        assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
        assert wav_frames(response.content) == (STEM_RATE, 2, frames)
        mixes.append(response.content)
    assert len(set(mixes)) == 4
    part = await client.get(done["urls"]["bass"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100
    # Asked again: the stems that are there, with 200.
    again = await client.post(f"/api/nodes/{child.id}/stems")
    assert again.status_code == 200 and again.json()["status"] == "ready"


async def test_stems_of_a_root_line_up_with_it(
    client: httpx.AsyncClient, chain: dict[str, Any], app: FastAPI
) -> None:
    root = chain["root"]
    assert (await client.post(f"/api/nodes/{root['id']}/stems")).status_code == 202
    done = await wait_stems(client, root["id"], "ready")
    assert done["frames"] == root["frames"]  # already 44.1 kHz: the same frames exactly
    media = services(app).media
    mix = read_wav(media.node_audio(chain["chain_id"], root["id"]))
    total = sum(read_wav(media.stem_file(chain["chain_id"], root["id"], s)) for s in STEMS)
    # The mock's stems sum to what it was given: the node's own audio, sample for sample.
    assert abs(total - mix).max() < 4 / 32768


async def test_stem_requests_are_checked(client: httpx.AsyncClient, app: FastAPI) -> None:
    created = (await upload(client, SAMPLE)).json()
    queued = await add_child(app, created["root"]["id"], status=NodeStatus.QUEUED)
    assert (await client.post(f"/api/nodes/{queued.id}/stems")).status_code == 409
    assert (await client.post("/api/nodes/nope/stems")).status_code == 404
    assert (await client.get("/api/nodes/nope/stems")).status_code == 404
    node_id = created["root"]["id"]
    never = (await client.get(f"/api/nodes/{node_id}/stems")).json()
    assert never["status"] is None and never["urls"] == {}
    assert (await client.get(f"/api/nodes/{node_id}/stems/drums")).status_code == 409
    bad_stem = await client.get(f"/api/nodes/{node_id}/stems/piano")
    assert bad_stem.status_code == 404
    assert (await client.post(f"/api/nodes/{node_id}/stems/cancel")).status_code == 409


@pytest.fixture
async def slow_stems(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=20)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


async def test_cancel_stops_a_running_separation(
    slow_stems: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = slow_stems
    root = (await upload(client, SAMPLE)).json()["root"]  # 8 s: 400 steps of 20 ms
    assert (await client.post(f"/api/nodes/{root['id']}/stems")).status_code == 202
    running = await wait_stems(client, root["id"], "separating")
    for _ in range(500):
        if (await client.get(f"/api/nodes/{root['id']}/stems")).json()["progress"]:
            break
        await asyncio.sleep(0.01)
    cancelled = await client.post(f"/api/nodes/{root['id']}/stems/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    worker = worker_of(app)
    for _ in range(100):  # the worker lets go within a step or two
        if not worker.running:
            break
        await asyncio.sleep(0.01)
    assert not worker.running
    assert running["status"] == "separating"
    assert (await client.post(f"/api/nodes/{root['id']}/stems/cancel")).status_code == 200
    folder = services(app).media.node_stems(root["chain_id"], root["id"])
    assert not folder.exists() or not any(folder.iterdir())
    # Asked for again, a cancelled separation starts over.
    assert (await client.post(f"/api/nodes/{root['id']}/stems")).json()["status"] == "queued"


async def test_discarding_a_node_stops_and_removes_its_stems(
    slow_stems: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = slow_stems
    root = (await upload(client, SAMPLE)).json()["root"]
    child = await add_child(app, root["id"], seconds=4)
    assert (await client.post(f"/api/nodes/{child.id}/stems")).status_code == 202
    await wait_stems(client, child.id, "separating")
    assert (await client.post(f"/api/nodes/{child.id}/discard")).status_code == 200
    worker = worker_of(app)
    for _ in range(100):
        if not worker.running:
            break
        await asyncio.sleep(0.01)
    assert not worker.running
    assert not services(app).media.node_stems(root["chain_id"], child.id).exists()


async def test_spine_stems_join_like_the_export(
    client: httpx.AsyncClient, chain: dict[str, Any]
) -> None:
    chain_id, child = chain["chain_id"], chain["child"]
    before = (await client.get(f"/api/chains/{chain_id}/stems")).json()
    assert before["ready"] is False and [n["status"] for n in before["nodes"]] == [None, None]
    assert (await client.get(f"/api/chains/{chain_id}/stems/drums")).status_code == 409
    queued = await client.post(f"/api/chains/{chain_id}/stems")
    assert queued.status_code == 202
    assert [n["status"] for n in queued.json()["nodes"]] == ["queued", "queued"]
    await wait_stems(client, child.id, "ready")
    after = (await client.get(f"/api/chains/{chain_id}/stems")).json()
    assert after["ready"] is True and sorted(after["urls"]) == sorted(STEMS)
    nothing_to_do = await client.post(f"/api/chains/{chain_id}/stems")
    assert nothing_to_do.status_code == 200
    joined = await client.get(after["urls"]["vocals"], params={"crossfade_ms": 20})
    assert joined.status_code == 200
    assert "attachment" in joined.headers["content-disposition"]
    export = await client.post(f"/api/chains/{chain_id}/export", json={"crossfade_ms": 20})
    rate, channels, frames = wav_frames(joined.content)
    assert (rate, channels, frames) == wav_frames(export.content)[:3]
    root_frames = chain["root"]["frames"]
    child_frames = round(child.frames * STEM_RATE / child.sample_rate)
    assert frames == root_frames + child_frames - round(0.020 * STEM_RATE)


@pytest.fixture
async def authed(
    tmp_path: Path,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    async with authed_app(
        tmp_path, {"paid": Tier.PAID, "free": Tier.FREE}, mock_step_ms=1, max_batch=1
    ) as running:
        yield running


async def test_a_free_key_gets_402(
    authed: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, tokens = authed
    client.headers.update(bearer(tokens["free"]))
    created = (await upload(client, SAMPLE)).json()
    node_id, chain_id = created["root"]["id"], created["chain"]["id"]
    for method, path in [
        ("POST", f"/api/nodes/{node_id}/stems"),
        ("GET", f"/api/nodes/{node_id}/stems"),
        ("POST", f"/api/nodes/{node_id}/stems/cancel"),
        ("GET", f"/api/nodes/{node_id}/stems/drums"),
        ("POST", f"/api/chains/{chain_id}/stems"),
        ("GET", f"/api/chains/{chain_id}/stems"),
        ("GET", f"/api/chains/{chain_id}/stems/drums"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 402, (method, path, response.text)
        assert response.json()["error"] == "payment_required"
    # Everything else works for a free key.
    exported = await client.post(f"/api/chains/{chain_id}/export", json={})
    assert exported.status_code == 200


async def test_the_tier_is_checked_again_when_the_job_runs(
    authed: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, tokens = authed
    client.headers.update(bearer(tokens["paid"]))
    root = (await upload(client, SAMPLE)).json()["root"]
    svc = services(app)
    # A long branch holds the worker (one job at a time), so that the stems job waits.
    branch = await client.post(f"/api/nodes/{root['id']}/branch", json={"duration_s": 60})
    assert branch.status_code == 202
    assert (await client.post(f"/api/nodes/{root['id']}/stems")).status_code == 202
    owner = (await svc.keys.caller(tokens["paid"])).owner
    assert owner is not None
    await svc.keys.set_tier(owner, Tier.FREE)  # downgraded while the job waits
    await client.post(f"/api/nodes/{branch.json()['nodes'][0]['id']}/cancel")
    for _ in range(500):
        stems = await svc.chains.store.get_stems(root["id"])
        if stems is not None and stems.status not in ("queued", "separating"):
            break
        await asyncio.sleep(0.01)
    assert stems is not None and stems.status == "error"
    assert stems.error is not None and stems.error.code == "payment_required"
    assert not svc.media.node_stems(root["chain_id"], root["id"]).exists()


async def test_stems_through_demucs_with_a_paid_key(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = Settings(
        data_dir=tmp_path / "d",
        auth="on",
        musicgen_model=str(tiny_models.musicgen),
        demucs_model=tiny_models.demucs_name,
        demucs_repo=tiny_models.demucs,
        device="cpu",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        _, token = await services(app).keys.create(tier=Tier.PAID, name="studio")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=bearer(token)
        ) as client:
            assert (await client.get("/api/chains")).status_code == 200
            created = (await upload(client, SAMPLE)).json()
            child = await add_child(app, created["root"]["id"], seconds=1.5)
            assert (await client.post(f"/api/nodes/{child.id}/stems")).status_code == 202
            done = await wait_stems(client, child.id, "ready", "error", timeout_s=120)
            assert done["status"] == "ready", done
            assert done["model"] == tiny_models.demucs_name
            assert child.frames and child.sample_rate
            frames = round(child.frames * STEM_RATE / child.sample_rate)
            for stem in STEMS:
                response = await client.get(f"/api/nodes/{child.id}/stems/{stem}")
                assert wav_frames(response.content) == (STEM_RATE, 2, frames)
            gpu = (await client.get("/api/gpu")).json()
            assert gpu["stems"]["engine"] == "demucs" and gpu["stems"]["loaded"] is True
            assert gpu["generation"]["engine"] == "musicgen"
            assert gpu["generation"]["decoder"] == "sparrow"  # the default, CPU or CUDA


async def test_stems_a_crash_left_running_end_interrupted(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    svc = services(app)
    if svc.db.kind != "sqlite":
        pytest.skip("start-up recovery is SQLite's; on PostgreSQL a dead worker's job is retried")
    root = (await upload(client, SAMPLE)).json()["root"]
    job = Job(
        id=new_id(),
        chain_id=root["chain_id"],
        kind=JobKind.STEMS,
        request={"node_ids": [root["id"]]},
        created_at=utc_now(),
    )
    async with svc.chains.store.write() as w:  # as a crash mid-separation leaves them
        await w.insert_job(job)
        await w.queue_stems(root["id"], root["chain_id"], job.id)
        await w.set_stems_status(root["id"], StemsStatus.SEPARATING)
        await w.claim_next_job()
    svc.media.make_node_stems_dir(root["chain_id"], root["id"])
    svc.media.stem_file(root["chain_id"], root["id"], "drums").write_bytes(b"RIFF half")
    assert await worker_of(app).recover() == 1
    await svc.chains.sweep_orphans()
    after = (await client.get(f"/api/nodes/{root['id']}/stems")).json()
    assert after["status"] == "error" and after["error"]["code"] == "interrupted"
    assert not svc.media.node_stems(root["chain_id"], root["id"]).exists()
    # Asked for again, it runs.
    assert (await client.post(f"/api/nodes/{root['id']}/stems")).status_code == 202
    assert (await wait_stems(client, root["id"], "ready"))["frames"] == root["frames"]


async def test_one_failing_node_does_not_fail_the_spine_job(
    client: httpx.AsyncClient, chain: dict[str, Any], app: FastAPI
) -> None:
    chain_id, child = chain["chain_id"], chain["child"]
    services(app).media.node_audio(chain_id, child.id).unlink()  # lost from the disk
    assert (await client.post(f"/api/chains/{chain_id}/stems")).status_code == 202
    failed = await wait_stems(client, child.id, "error", "ready")
    assert failed["status"] == "error" and failed["error"]["code"] == "storage_unavailable"
    root = await wait_stems(client, chain["root"]["id"], "ready", "error")
    assert root["status"] == "ready" and sorted(root["urls"]) == sorted(STEMS)
