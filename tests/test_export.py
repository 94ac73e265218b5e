"""Exporting the spine through the API, checked with ffprobe.

The chain is the normal case: the 44.1 kHz stereo sample as the root, then two
32 kHz mono continuations. Lengths are checked to the sample: every segment
counts ``round(frames · 44100 / rate)`` frames, minus one crossfade per join.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from helpers import SAMPLE, add_child, services, upload
from probe import ebur128, ffprobe

from sparrow.api import create_app
from sparrow.audio import render_music, write_wav
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio

RATE = 44_100
MPEG_FRAME = 1152


@pytest.fixture
async def spine(client: httpx.AsyncClient, app: FastAPI) -> dict[str, Any]:
    created = (await upload(client, SAMPLE, title="Night drive")).json()
    first = await add_child(app, created["root"]["id"], seconds=1.0, seed=1)
    second = await add_child(app, first.id, seconds=1.25, seed=2)
    assert (await client.post(f"/api/nodes/{second.id}/commit")).status_code == 200
    frames = [created["root"]["frames"], round(32_000 * RATE / 32_000), 55_125]
    return {"chain_id": created["chain"]["id"], "frames": frames, "last": second.id}


async def export(
    client: httpx.AsyncClient, chain_id: str, tmp_path: Path, **body: Any
) -> tuple[httpx.Response, Path]:
    response = await client.post(f"/api/chains/{chain_id}/export", json=body)
    assert response.status_code == 200, response.text
    out = tmp_path / f"export.{body.get('format', 'wav')}"
    out.write_bytes(response.content)
    return response, out


@pytest.mark.parametrize("crossfade_ms", [0, 20])
async def test_wav_export_is_sample_exact(
    client: httpx.AsyncClient, spine: dict[str, Any], tmp_path: Path, crossfade_ms: int
) -> None:
    response, path = await export(
        client, spine["chain_id"], tmp_path, format="wav", crossfade_ms=crossfade_ms
    )
    assert response.headers["content-type"] == "audio/wav"
    # RFC 6266: the title, percent-encoded (it has a space), as browsers decode it.
    assert (
        response.headers["content-disposition"] == "attachment; filename*=utf-8''Night%20drive.wav"
    )
    stream = ffprobe(path)
    assert (stream["codec_name"], int(stream["sample_rate"]), stream["channels"]) == (
        "pcm_s16le",
        RATE,
        2,
    )
    joins = len(spine["frames"]) - 1
    expected = sum(spine["frames"]) - joins * round(crossfade_ms * RATE / 1000)
    assert stream["duration_ts"] == expected == stream["decoded_samples"]


@pytest.mark.parametrize(
    ("fmt", "codec", "tolerance"), [("flac", "flac", 0), ("mp3", "mp3", MPEG_FRAME)]
)
async def test_flac_and_mp3_have_the_spine_duration(
    client: httpx.AsyncClient,
    spine: dict[str, Any],
    tmp_path: Path,
    fmt: str,
    codec: str,
    tolerance: int,
) -> None:
    response, path = await export(client, spine["chain_id"], tmp_path, format=fmt)
    assert response.headers["content-type"] == {"flac": "audio/flac", "mp3": "audio/mpeg"}[fmt]
    stream = ffprobe(path)
    assert stream["codec_name"] == codec and int(stream["sample_rate"]) == RATE
    expected = sum(spine["frames"]) - 2 * round(0.020 * RATE)
    assert abs(stream["decoded_samples"] - expected) <= tolerance


async def test_the_same_spine_and_options_reuse_the_file(
    client: httpx.AsyncClient, spine: dict[str, Any], app: FastAPI
) -> None:
    chain_id = spine["chain_id"]
    first = await client.post(f"/api/chains/{chain_id}/export", json={"format": "flac"})
    folder = services(app).media.chain_exports(chain_id)
    [made] = list(folder.iterdir())
    stamp = made.stat().st_mtime_ns
    again = await client.post(f"/api/chains/{chain_id}/export", json={"format": "flac"})
    assert again.headers["ETag"] == first.headers["ETag"] and again.content == first.content
    assert made.stat().st_mtime_ns == stamp and len(list(folder.iterdir())) == 1
    other = await client.post(
        f"/api/chains/{chain_id}/export", json={"format": "flac", "crossfade_ms": 0}
    )
    assert other.headers["ETag"] != first.headers["ETag"]
    # A changed spine is a new export.
    assert (await client.post(f"/api/nodes/{spine['last']}/uncommit")).status_code == 200
    shorter = await client.post(f"/api/chains/{chain_id}/export", json={"format": "flac"})
    assert shorter.headers["ETag"] not in (first.headers["ETag"], other.headers["ETag"])
    assert len(list(folder.iterdir())) == 3
    assert (await client.delete(f"/api/chains/{chain_id}")).status_code == 204
    assert not folder.exists()


async def test_export_requests_are_checked(
    client: httpx.AsyncClient, spine: dict[str, Any]
) -> None:
    url = f"/api/chains/{spine['chain_id']}/export"
    for body in (
        {"format": "ogg"},
        {"crossfade_ms": -1},
        {"crossfade_ms": 5000},
        {"crossfade_ms": "20"},
        {"format": "wav", "extra": 1},
        {"loudness_lufs": -41},
        {"loudness_lufs": -4.9},
        {"loudness_lufs": "-14"},
        {"loudness_lufs": True},
        {"loudness_lufs": "NaN"},
    ):
        response = await client.post(url, json=body)
        assert response.status_code == 422, body
        assert response.json()["error"] == "invalid_input"
    # The 1 s continuation in the middle cannot lose 0.6 s at both of its ends.
    too_long = await client.post(url, json={"crossfade_ms": 600})
    assert too_long.status_code == 422 and "crossfade" in too_long.json()["detail"]
    assert (await client.post("/api/chains/nope/export", json={})).status_code == 404


async def test_a_spine_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", engine="mock", max_export_s=5))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            chain_id = (await upload(client, SAMPLE)).json()["chain"]["id"]  # 8 s
            response = await client.post(f"/api/chains/{chain_id}/export", json={})
            assert response.status_code == 422
            assert "limited to 5 s" in response.json()["detail"]
            assert not os.listdir(services(app).media.exports_dir)


async def test_concurrent_identical_exports_are_made_once(
    client: httpx.AsyncClient, spine: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparrow.audio.join import join_segments as join
    from sparrow.domain import export as export_module

    made: list[Path] = []

    async def counting(paths: Any, dst: Path, **kwargs: Any) -> Any:
        made.append(dst)
        return await join(paths, dst, **kwargs)

    monkeypatch.setattr(export_module, "join_segments", counting)
    url = f"/api/chains/{spine['chain_id']}/export"
    answers = await asyncio.gather(*(client.post(url, json={"format": "flac"}) for _ in range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.content for a in answers}) == 1
    assert len(made) == 1


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
@pytest.mark.parametrize("level", [0.03, 1.8])  # about -43 and -16 LUFS, clipped peaks
async def test_an_export_at_a_loudness_measures_it(
    client: httpx.AsyncClient, tmp_path: Path, fmt: str, level: float
) -> None:
    """Measured with FFmpeg's ebur128: within 1 LU of the target, true peak at most -1 dBTP,
    and (WAV, FLAC) exactly the frames of the plain export."""
    clip = tmp_path / "clip.wav"
    music = render_music(6.0, RATE, 2, seed=4) * level
    write_wav(clip, np.clip(music, -1, 1).astype(np.float32), RATE)
    chain_id = (await upload(client, clip)).json()["chain"]["id"]
    _, plain = await export(client, chain_id, tmp_path, format=fmt)
    plain_frames = ffprobe(plain)["decoded_samples"]
    for target in (-14.0, -23.0):
        _, path = await export(client, chain_id, tmp_path, format=fmt, loudness_lufs=target)
        integrated, peak = ebur128(path)
        assert abs(integrated - target) <= 1.0, (target, integrated)
        assert peak <= -1.0, (target, peak)
        frames = ffprobe(path)["decoded_samples"]
        assert frames == plain_frames or (fmt == "mp3" and abs(frames - plain_frames) <= MPEG_FRAME)


async def test_a_loudness_is_part_of_the_export_s_identity(
    client: httpx.AsyncClient, spine: dict[str, Any]
) -> None:
    url = f"/api/chains/{spine['chain_id']}/export"
    plain = await client.post(url, json={})
    loud = await client.post(url, json={"loudness_lufs": -14})
    quiet = await client.post(url, json={"loudness_lufs": -23.0})
    tags = {r.headers["ETag"] for r in (plain, loud, quiet)}
    assert len(tags) == 3
    again = await client.post(url, json={"loudness_lufs": -14.0})
    assert again.headers["ETag"] == loud.headers["ETag"] and again.content == loud.content
