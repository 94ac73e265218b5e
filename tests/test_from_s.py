"""Continuing from any point (SPEC §12): ``from_s``, and the one rule of how a path plays.

The path root→node plays every ancestor up to where its child on the path begins.
These tests hold that rule to the frame wherever the audio of a path is used: the
context the engine is given, the spine's numbers, the WAV export with and without
a crossfade, and the spine's own audio and peaks routes.
"""

from __future__ import annotations

import io
import math
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from helpers import (
    SAMPLE,
    add_child,
    both_databases,
    branch,
    recorded_rows,
    services,
    upload,
    wait_for_status,
)
from live import running_server

from sparrow.audio import compute_peaks, read_wav
from sparrow.models import LOCAL_USER, Node, NodeKind, NodeStatus, played
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


def node(**fields: Any) -> Node:
    base: dict[str, Any] = {
        "chain_id": "c",
        "kind": NodeKind.CONTINUATION,
        "status": NodeStatus.READY,
        "committed": True,
        "created_at": "",
        "updated_at": "",
    }
    return Node(**{**base, **fields})


def test_a_path_plays_each_ancestor_up_to_where_its_child_begins() -> None:
    root = node(id="r", parent_id=None, kind=NodeKind.UPLOAD, frames=44_100, sample_rate=44_100)
    a = node(id="a", parent_id="r", from_s=0.25, frames=64_000, sample_rate=32_000)
    b = node(id="b", parent_id="a", from_s=1.5, frames=32_000, sample_rate=32_000)
    whole = node(id="w", parent_id="b", from_s=None, frames=100, sample_rate=32_000)
    path = played([root, a, b, whole])
    assert [p.frames for p in path] == [11_025, 48_000, 32_000, 100]
    assert [p.offset_s for p in path] == pytest.approx([0, 0.25, 1.75, 2.75])
    assert path[-1].play_s == pytest.approx(100 / 32_000)
    # A from_s past the end plays the parent whole; a tiny one still plays one frame.
    past = node(id="p", parent_id="r", from_s=9.0, frames=10, sample_rate=32_000)
    tiny = node(id="t", parent_id="r", from_s=1e-9, frames=10, sample_rate=32_000)
    assert played([root, past])[0].frames == 44_100
    assert played([root, tiny])[0].frames == 1


@both_databases
async def test_the_engine_is_given_the_context_ending_exactly_at_from_s(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = recorded_rows(services(app).generation.engine, monkeypatch)
    root = (await upload(client, SAMPLE)).json()["root"]
    parent = await add_child(app, root["id"], seconds=2.0, seed=5)
    parent_audio = read_wav(services(app).media.node_audio(parent.chain_id, parent.id))

    for from_s in (1.234, 0.1, 2.0):
        [child] = await branch(client, parent.id, from_s=from_s, context_s=0.5, duration_s=0.5)
        assert child["from_s"] == from_s
        await wait_for_status(client, [child["id"]], "ready")
        context = asked[-1].context
        end = round(from_s * 32_000)
        start = max(0, end - 16_000)
        # Half a second: the root's end comes before a parent played for less than that.
        assert context.shape == (16_000, 1)
        # The parent is at the engine's rate: the context ends in its very samples.
        np.testing.assert_array_equal(context[-(end - start) :], parent_audio[start:end])

    # Siblings from different points of one parent; the parent's end when omitted.
    [end_child] = await branch(client, parent.id, duration_s=0.5)
    assert end_child["from_s"] == pytest.approx(2.0)
    nodes = (await client.get(f"/api/chains/{parent.chain_id}")).json()["nodes"]
    assert sorted(n["from_s"] for n in nodes if n["parent_id"] == parent.id) == pytest.approx(
        [0.1, 1.234, 2.0, 2.0]
    )
    assert next(n for n in nodes if n["id"] == root["id"])["from_s"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"from_s": 0},
        {"from_s": -1},
        {"from_s": 999},
        {"from_s": "1.0"},
        {"from_s": True},
        {"from_s": [1]},
        {"loudness": 1},
        {"match_loudness": "yes"},
        {"match_loudness": 1},
    ],
)
async def test_bad_from_s_is_422_and_creates_nothing(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    root = (await upload(client, SAMPLE)).json()["root"]
    response = await client.post(f"/api/nodes/{root['id']}/branch", json={"duration_s": 1, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_input"
    chain = (await client.get(f"/api/chains/{root['chain_id']}")).json()
    assert len(chain["nodes"]) == 1
    # NaN is not JSON, but some clients send it anyway.
    raw = b'{"duration_s": 1, "from_s": NaN}'
    response = await client.post(
        f"/api/nodes/{root['id']}/branch",
        content=raw,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


async def test_from_s_within_the_last_frame_of_the_parent(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    root = (await upload(client, SAMPLE)).json()["root"]
    parent = await add_child(app, root["id"], seconds=1.0)
    duration = (await services(app).chains.get_node(LOCAL_USER, parent.id)).duration_s
    assert duration is not None
    [ok] = await branch(client, parent.id, from_s=duration, duration_s=0.5)
    assert ok["from_s"] == duration
    response = await client.post(
        f"/api/nodes/{parent.id}/branch", json={"from_s": duration + 1e-6, "duration_s": 0.5}
    )
    assert response.status_code == 422
    assert "parent's duration" in response.json()["detail"]


# -- through a real server ---------------------------------------------------------------


def wait_ready(base: str, node_ids: list[str], timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [httpx.get(f"{base}/api/nodes/{n}", timeout=10).json() for n in node_ids]
        if all(n["status"] == "ready" for n in nodes):
            return nodes
        assert time.monotonic() < deadline, nodes
        time.sleep(0.05)


def wav_of(body: bytes) -> tuple[int, int, int]:
    with wave.open(io.BytesIO(body)) as w:
        return w.getnframes(), w.getframerate(), w.getnchannels()


def test_continuing_from_the_middle_holds_to_the_frame(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=1)
    with running_server(settings) as base:
        created = httpx.post(
            f"{base}/api/chains", files={"file": ("s.flac", SAMPLE.read_bytes())}, timeout=30
        )
        root = created.json()["root"]
        chain_id = root["chain_id"]

        def branch_from(parent: dict[str, Any], **body: Any) -> dict[str, Any]:
            response = httpx.post(f"{base}/api/nodes/{parent['id']}/branch", json=body, timeout=10)
            assert response.status_code == 202, response.text
            [made] = wait_ready(base, [response.json()["nodes"][0]["id"]])
            return made

        # From the middle of the upload, then from the middle of that continuation.
        a = branch_from(root, from_s=root["duration_s"] / 2, duration_s=2.0, seed=1)
        b = branch_from(a, from_s=0.7731, duration_s=1.5, seed=2)
        assert httpx.post(f"{base}/api/nodes/{b['id']}/commit", timeout=10).status_code == 200

        spine = httpx.get(f"{base}/api/chains/{chain_id}/spine", timeout=10).json()
        played_frames = [
            round(a["from_s"] * root["sample_rate"]),
            round(b["from_s"] * a["sample_rate"]),
            b["frames"],
        ]
        rates = [root["sample_rate"], a["sample_rate"], b["sample_rate"]]
        play_s = [f / r for f, r in zip(played_frames, rates, strict=True)]
        assert [e["node"]["id"] for e in spine["nodes"]] == [root["id"], a["id"], b["id"]]
        assert [e["play_s"] for e in spine["nodes"]] == pytest.approx(play_s, abs=1e-6)
        assert [e["offset_s"] for e in spine["nodes"]] == pytest.approx(
            [0, play_s[0], play_s[0] + play_s[1]], abs=1e-6
        )
        assert spine["duration_s"] == pytest.approx(sum(play_s), abs=1e-6)

        def export(crossfade_ms: float) -> bytes:
            response = httpx.post(
                f"{base}/api/chains/{chain_id}/export",
                json={"format": "wav", "crossfade_ms": crossfade_ms},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            return response.content

        plain = export(0)
        frames, rate, _ = wav_of(plain)
        assert rate == max(rates)
        expected = [f * rate / r for f, r in zip(played_frames, rates, strict=True)]
        assert abs(frames - sum(expected)) <= len(expected)  # ±1 frame per segment
        faded, _, _ = wav_of(export(50))
        assert faded == frames - 2 * round(0.05 * rate)

        # The segment of b in the export is b's own audio up to its end, resampled.
        mix = read_wav_bytes(plain)
        b_audio = read_wav_bytes(httpx.get(f"{base}/api/nodes/{b['id']}/audio").content)
        tail = mix[-rate // 2 :, 0]  # b's last half second, at the export's rate
        at = b["frames"] - b["sample_rate"] / 2 + np.arange(len(tail)) * b["sample_rate"] / rate
        resampled = np.interp(at, np.arange(b["frames"]), b_audio[:, 0])
        assert np.corrcoef(tail, resampled)[0, 1] > 0.9

        # The spine as it plays: the same frames as the export, with Range and an ETag.
        audio = httpx.get(f"{base}/api/chains/{chain_id}/spine/audio", timeout=60)
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        assert audio.content == plain
        etag = audio.headers["etag"]
        again = httpx.get(
            f"{base}/api/chains/{chain_id}/spine/audio", headers={"If-None-Match": etag}
        )
        assert again.status_code == 304
        part = httpx.get(
            f"{base}/api/chains/{chain_id}/spine/audio", headers={"Range": "bytes=44-1043"}
        )
        assert part.status_code == 206 and part.content == plain[44:1044]
        head = httpx.head(f"{base}/api/chains/{chain_id}/spine/audio")
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(plain)

        peaks = httpx.get(
            f"{base}/api/chains/{chain_id}/spine/peaks", params={"pixels_per_second": 20}
        )
        assert peaks.status_code == 200, peaks.text
        data = peaks.json()
        assert (data["sample_rate"], data["samples_per_pixel"]) == (rate, rate // 20)
        assert data["length"] == math.ceil(frames / (rate // 20))
        saved = tmp_path / "spine.wav"
        saved.write_bytes(plain)
        assert data == compute_peaks(saved, samples_per_pixel=rate // 20)
        bad = httpx.get(
            f"{base}/api/chains/{chain_id}/spine/peaks",
            params={"pixels_per_second": 20, "samples_per_pixel": 512},
        )
        assert bad.status_code == 422

        # Another take committed: the spine, its audio and its ETag change.
        c = branch_from(a, from_s=1.0, duration_s=0.5, seed=3)
        assert httpx.post(f"{base}/api/nodes/{c['id']}/commit", timeout=10).status_code == 200
        changed = httpx.get(
            f"{base}/api/chains/{chain_id}/spine/audio", headers={"If-None-Match": etag}
        )
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        frames_c, _, _ = wav_of(changed.content)
        expected_c = (
            played_frames[0] * rate / rates[0]
            + round(1.0 * a["sample_rate"]) * (rate / a["sample_rate"])
            + c["frames"] * rate / c["sample_rate"]
        )
        assert abs(frames_c - expected_c) <= 3


def read_wav_bytes(body: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    with wave.open(io.BytesIO(body)) as w:
        channels, width = w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    assert width == 2
    return (np.frombuffer(raw, dtype="<i2").reshape(-1, channels) / 32768).astype(np.float32)
