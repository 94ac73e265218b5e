"""Putting chains into a running Sparrow through its API, for the benchmarks that need some."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx

from sparrow.audio import render_music, write_wav

CLIP_RATE = 32_000
READY_TIMEOUT_S = 60.0


def wav_bytes(folder: Path, seconds: float, seed: int = 0) -> bytes:
    """A mono 32 kHz 16-bit WAV of ``seconds`` of music (written in ``folder`` on the way)."""
    path = folder / f"clip-{seconds:g}s-{seed}.wav"
    write_wav(path, render_music(seconds, CLIP_RATE, 1, seed=seed), CLIP_RATE)
    return path.read_bytes()


def create_chain(client: httpx.Client, audio: bytes, name: str = "clip.wav") -> dict[str, Any]:
    """``POST /api/chains`` with ``audio`` as the file; the ``{chain, root}`` answer."""
    response = client.post("/api/chains", files={"file": (name, io.BytesIO(audio))})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def analysed(client: httpx.Client, node_ids: list[str]) -> None:
    """Wait until every node's analysis is recorded: the server's analyser is idle again,
    so a measurement that follows does not share the CPU with it."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for node_id in node_ids:
        while client.get(f"/api/nodes/{node_id}").json()["analysis"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} was not analysed in {READY_TIMEOUT_S:g} s")
            time.sleep(0.05)


def ready_branch(client: httpx.Client, parent_id: str, duration_s: float = 0.5) -> str:
    """Branch one continuation under ``parent_id`` and wait until it is ready; its id."""
    response = client.post(
        f"/api/nodes/{parent_id}/branch",
        json={"prompt": "bench", "duration_s": duration_s, "count": 1},
    )
    assert response.status_code == 202, response.text
    node_id: str = response.json()["nodes"][0]["id"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = client.get(f"/api/nodes/{node_id}").json()["status"]
        if status == "ready":
            return node_id
        assert status in ("queued", "generating"), f"the branch ended {status}"
        time.sleep(0.05)
    raise TimeoutError(f"node {node_id} was not ready in {READY_TIMEOUT_S:g} s")
