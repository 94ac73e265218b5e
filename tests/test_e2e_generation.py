"""The whole flow through a real server on 127.0.0.1, with each engine.

upload → branch count=3 → the event stream shows each node queued → generating
(with progress) → ready → three different audios of exactly the requested
duration → commit one → branch again from it. With ``musicgen`` the real
transformers code runs on the tiny random-weight model, loaded from its folder.
"""

from __future__ import annotations

import hashlib
import io
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from helpers import SAMPLE
from live import running_server
from probe import ffprobe
from sse import Message, Stream, open_stream

from sparrow.settings import Settings

if TYPE_CHECKING:
    from sparrow.engines.tiny import TinyModels

DURATION_S = 1.1
SAMPLE_RATE = 32_000


@pytest.fixture(params=["mock", "musicgen"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "musicgen":
        tiny: TinyModels = request.getfixturevalue("tiny_models")
        settings = Settings(data_dir=tmp_path / "d", musicgen_model=str(tiny.musicgen))
    else:
        settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=2)
    with running_server(settings) as base:
        yield base


def ready_count(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.event == "node-status" and m.json["status"] == "ready")


def generate(
    base: str, stream: Stream, parent_id: str, count: int, **body: Any
) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{base}/api/nodes/{parent_id}/branch",
        json={"count": count, "duration_s": DURATION_S, **body},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    nodes: list[dict[str, Any]] = response.json()["nodes"]
    assert all(n["status"] == "queued" for n in nodes)
    messages = stream.collect(lambda m: ready_count(m) == count, timeout_s=60)
    for node in nodes:
        mine = [m for m in messages if m.json.get("node_id") == node["id"]]
        assert [m.json["status"] for m in mine if m.event == "node-status"] == [
            "queued",
            "generating",
            "ready",
        ]
        progress = [m.json["progress"] for m in mine if m.event == "node-progress"]
        assert progress and progress == sorted(progress) and progress[-1] == 1.0
    return nodes


def wav_frames(base: str, node_id: str) -> tuple[int, int, str]:
    body = httpx.get(f"{base}/api/nodes/{node_id}/audio", timeout=10).content
    with wave.open(io.BytesIO(body)) as w:
        return w.getnframes(), w.getframerate(), hashlib.sha256(body).hexdigest()


def test_upload_branch_commit_branch_again(server: str) -> None:
    created = httpx.post(
        f"{server}/api/chains", files={"file": ("s.flac", SAMPLE.read_bytes())}, timeout=30
    ).json()
    chain_id, root_id = created["chain"]["id"], created["root"]["id"]
    with open_stream(server, chain_id, read_timeout_s=60) as stream:
        siblings = generate(server, stream, root_id, 3, prompt="warm lofi piano", seed=11)
        audio = [wav_frames(server, n["id"]) for n in siblings]
        assert [(frames, rate) for frames, rate, _ in audio] == [
            (round(DURATION_S * SAMPLE_RATE), SAMPLE_RATE)
        ] * 3
        assert len({sha for _, _, sha in audio}) == 3

        chosen = siblings[1]["id"]
        spine = httpx.post(f"{server}/api/nodes/{chosen}/commit").json()["spine"]
        assert [e["node"]["id"] for e in spine["nodes"]] == [root_id, chosen]
        assert spine["duration_s"] == pytest.approx(8.0 + DURATION_S)

        [child] = generate(server, stream, chosen, 1, context_s=5, seed=99)
        frames, _, _ = wav_frames(server, child["id"])
        assert frames == round(DURATION_S * SAMPLE_RATE)
        node = httpx.get(f"{server}/api/nodes/{child['id']}").json()
        assert node["parent_id"] == chosen and node["params"]["seed"] == 99

        # Determinism: the same parent, params and seed give identical audio.
        [again] = generate(server, stream, root_id, 1, prompt="warm lofi piano", seed=12)
        assert wav_frames(server, again["id"])[2] == audio[1][2]


def test_stereo_checkpoint_end_to_end(tiny_models: TinyModels, tmp_path: Path) -> None:
    """A stereo MusicGen gives stereo nodes of exact frames; the export and the stems of
    the spine stay stereo."""
    settings = Settings(
        data_dir=tmp_path / "d",
        musicgen_model=str(tiny_models.musicgen_stereo),
        demucs_model=tiny_models.demucs_name,
        demucs_repo=tiny_models.demucs,
    )
    with running_server(settings) as base:
        created = httpx.post(
            f"{base}/api/chains", files={"file": ("s.flac", SAMPLE.read_bytes())}, timeout=30
        ).json()
        chain_id, root = created["chain"]["id"], created["root"]
        with open_stream(base, chain_id, read_timeout_s=60) as stream:
            [a] = generate(base, stream, root["id"], 1, seed=3, from_s=4.0)
            [b] = generate(base, stream, a["id"], 1, seed=4)
        for node in (a, b):
            body = httpx.get(f"{base}/api/nodes/{node['id']}/audio", timeout=10).content
            with wave.open(io.BytesIO(body)) as w:
                assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (
                    2,
                    SAMPLE_RATE,
                    round(DURATION_S * SAMPLE_RATE),
                )
            shown = httpx.get(f"{base}/api/nodes/{node['id']}").json()
            assert (shown["channels"], shown["frames"]) == (2, round(DURATION_S * SAMPLE_RATE))
        assert httpx.post(f"{base}/api/nodes/{b['id']}/commit").status_code == 200
        exported = httpx.post(
            f"{base}/api/chains/{chain_id}/export",
            json={"format": "flac", "crossfade_ms": 0},
            timeout=60,
        )
        assert exported.status_code == 200
        out = tmp_path / "spine.flac"
        out.write_bytes(exported.content)
        probed = ffprobe(out)
        rate = int(probed["sample_rate"])
        assert int(probed["channels"]) == 2
        played = [4.0 * rate, 2 * DURATION_S * rate]  # the upload up to a's from_s, then a, b
        assert abs(probed["decoded_samples"] - sum(played)) <= 3

        # Stems of the spine: every node's, stereo, and the spine's stem as long as the mix.
        asked = httpx.post(f"{base}/api/chains/{chain_id}/stems", timeout=10)
        assert asked.status_code == 202, asked.text
        deadline = time.monotonic() + 120
        while True:
            listed = httpx.get(f"{base}/api/chains/{chain_id}/stems", timeout=10).json()
            if listed["ready"]:
                break
            assert all(n["status"] in ("queued", "separating", "ready") for n in listed["nodes"])
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        assert [n["channels"] for n in listed["nodes"]] == [2, 2, 2]
        stem = httpx.get(
            f"{base}/api/chains/{chain_id}/stems/drums",
            params={"format": "wav", "crossfade_ms": 0},
            timeout=60,
        )
        assert stem.status_code == 200, stem.text
        with wave.open(io.BytesIO(stem.content)) as w:
            assert w.getnchannels() == 2
            assert abs(w.getnframes() - sum(played) * w.getframerate() / rate) <= 3
