"""Musical analysis of every ready node (SPEC §12): tempo, key, loudness, true peak.

The audio is synthesized with a known answer (``musical``); loudness is checked
against FFmpeg's own ``ebur128`` figures, not Sparrow's code; the ``node-analysis``
event is read from a real SSE stream of a real server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from helpers import SAMPLE, add_child, both_databases, chain_with_root, services, upload
from live import running_server
from musical import cadence, drum_pattern
from probe import ebur128
from sse import open_stream

from sparrow.audio import write_wav
from sparrow.audio.analysis import analyse
from sparrow.models import NodeKind, NodeStatus, new_id, utc_now
from sparrow.priority import BACKGROUND_NICE, background
from sparrow.settings import Settings

RATE = 32_000


@pytest.mark.parametrize("bpm", [90, 120, 140])
@pytest.mark.parametrize("seconds", [10, 30])
def test_a_drum_pattern_reads_its_tempo(bpm: int, seconds: int) -> None:
    found = analyse(drum_pattern(bpm, seconds), RATE)
    assert found.tempo_bpm == pytest.approx(bpm, abs=2)
    assert found.key is None  # drums have no key


@pytest.mark.parametrize(
    ("tonic", "minor", "key"),
    [(0, False, "C major"), (9, True, "A minor"), (7, False, "G major"), (2, True, "D minor")],
)
def test_a_cadence_reads_its_key(tonic: int, minor: bool, key: str) -> None:
    found = analyse(cadence(tonic, minor, 12), RATE)
    assert found.key == key
    assert found.tempo_bpm == pytest.approx(60, abs=2)  # one chord a second


def test_drums_over_a_cadence_read_both() -> None:
    mix = drum_pattern(128, 12) + cadence(0, False, 12)
    found = analyse(mix, RATE)
    assert (round(found.tempo_bpm or 0), found.key) == (128, "C major")


@pytest.mark.parametrize(
    "samples",
    [np.zeros(10 * RATE, np.float32), np.full(RATE // 2, 0.3, np.float32), np.zeros(0, np.float32)],
    ids=["silence", "too-short", "empty"],
)
def test_what_tells_nothing_reads_null(samples: np.ndarray[Any, Any]) -> None:
    found = analyse(samples, RATE)
    assert (found.tempo_bpm, found.key) == (None, None)


@pytest.mark.parametrize("seed", range(4))
def test_noise_has_no_key(seed: int) -> None:
    noise = np.random.default_rng(seed).standard_normal(5 * RATE).astype(np.float32)
    assert analyse(0.1 * noise, RATE).key is None


def test_a_steady_tone_has_no_tempo() -> None:
    t = np.arange(10 * RATE) / RATE
    found = analyse((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE)
    assert found.tempo_bpm is None


def wav_bytes(samples: np.ndarray[Any, Any], tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    write_wav(path, samples.reshape(-1, 1), RATE)
    return path


def test_every_ready_node_is_analysed_and_announced_on_the_stream(tmp_path: Path) -> None:
    clip = wav_bytes(0.5 * drum_pattern(120, 12) + cadence(9, True, 12), tmp_path, "clip.wav")
    lufs, peak = ebur128(clip)
    settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=1)
    with running_server(settings) as base:
        created = httpx.post(
            f"{base}/api/chains", files={"file": ("clip.wav", clip.read_bytes())}, timeout=30
        ).json()
        chain_id, root = created["chain"]["id"], created["root"]
        assert root["analysis"] is None  # a few seconds after it is ready, not in the upload
        with open_stream(base, chain_id, last_event_id="0", read_timeout_s=30) as stream:
            [message] = [
                m
                for m in stream.collect(
                    lambda got: any(m.event == "node-analysis" for m in got), timeout_s=30
                )
                if m.event == "node-analysis"
            ]
            assert message.id is not None
            data = message.json
            assert (data["node_id"], data["chain_id"]) == (root["id"], chain_id)
            analysis = data["analysis"]
            assert analysis["tempo_bpm"] == pytest.approx(120, abs=2)
            assert analysis["key"] == "A minor"
            assert analysis["loudness_lufs"] == pytest.approx(lufs, abs=0.1)
            assert analysis["true_peak_dbtp"] == pytest.approx(peak, abs=0.1)
            stored = httpx.get(f"{base}/api/nodes/{root['id']}").json()
            assert stored["analysis"] == analysis

            # A continuation is analysed too, once ready; its loudness as ebur128 reads it.
            response = httpx.post(
                f"{base}/api/nodes/{root['id']}/branch", json={"duration_s": 3, "seed": 4}
            )
            [child] = response.json()["nodes"]
            got = stream.collect(
                lambda got: any(
                    m.event == "node-analysis" and m.json["node_id"] == child["id"] for m in got
                ),
                timeout_s=30,
            )
            statuses = [m.json["status"] for m in got if m.event == "node-status"]
            assert statuses[-1] == "ready"  # announced before its analysis
            analysed = httpx.get(f"{base}/api/nodes/{child['id']}").json()["analysis"]
            audio = tmp_path / "child.wav"
            audio.write_bytes(httpx.get(f"{base}/api/nodes/{child['id']}/audio").content)
            child_lufs, child_peak = ebur128(audio)
            assert analysed["loudness_lufs"] == pytest.approx(child_lufs, abs=0.1)
            assert analysed["true_peak_dbtp"] == pytest.approx(child_peak, abs=0.1)
            assert set(analysed) == {"tempo_bpm", "key", "loudness_lufs", "true_peak_dbtp"}


@pytest.mark.anyio
@both_databases
async def test_a_node_is_claimed_by_one_analyser_and_analysed_once(app: FastAPI) -> None:
    svc = services(app)
    assert svc.analyser is not None
    await svc.analyser.stop()  # this test plays the analysers' part itself
    store = svc.chains.store
    chain, root = chain_with_root()
    root = type(root)(**{**root.__dict__, "frames": 10, "sample_rate": RATE, "channels": 1})
    async with store.write() as w:
        await w.create_chain(chain, root)
    now, stale = utc_now(), "1970-01-01T00:00:00.000Z"
    assert await store.next_unanalysed(stale) == root.id
    async with store.write() as w:
        assert await w.claim_analysis(root.id, now, stale) is not None
    async with store.write() as w:  # claimed, and not stale yet: another analyser skips it
        assert await w.claim_analysis(root.id, now, stale) is None
    assert await store.next_unanalysed(stale) is None
    # A claim older than the stale time is free again (its analyser died).
    assert await store.next_unanalysed("9999-01-01T00:00:00.000Z") == root.id
    result = {"tempo_bpm": None, "key": None, "loudness_lufs": -20.0, "true_peak_dbtp": -3.0}
    async with store.write() as w:
        assert (await w.set_analysis(root.id, result)) is not None
        assert await w.set_analysis(root.id, result) is None  # once
    assert await store.next_unanalysed("9999-01-01T00:00:00.000Z") is None
    stored = await store.get_node(root.id)
    assert stored is not None and stored.analysis == result
    # Nodes that are not ready wait for nothing.
    queued = type(root)(
        **{
            **root.__dict__,
            "id": new_id(),
            "parent_id": root.id,
            "kind": NodeKind.CONTINUATION,
            "status": NodeStatus.QUEUED,
            "committed": False,
            "analysis": None,
        }
    )
    async with store.write() as w:
        await w.insert_nodes([queued])
    assert await store.next_unanalysed("9999-01-01T00:00:00.000Z") is None


@pytest.mark.anyio
async def test_a_damaged_node_keeps_a_null_analysis_and_the_analyser_goes_on(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    root = (await upload(client, SAMPLE)).json()["root"]
    damaged = await add_child(app, root["id"], seconds=2.0)
    path = services(app).media.node_audio(damaged.chain_id, damaged.id)
    path.write_bytes(path.read_bytes()[:-100] + bytes(100))  # same size, other samples
    deadline = time.monotonic() + 30
    while not any(damaged.id in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the damaged node was not tried"
        await asyncio.sleep(0.05)
    assert (await client.get(f"/api/nodes/{damaged.id}")).json()["analysis"] is None
    later = await add_child(app, root["id"], seconds=2.0, seed=9)
    assert (await wait_for_analysis(client, later.id))["analysis"]["loudness_lufs"] is not None


@pytest.mark.anyio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, nice values")
async def test_the_analysis_runs_in_a_process_of_its_own_at_the_lowest_cpu_priority(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """librosa runs in another process at nice 19; the server's own threads are as they
    were (a thread at nice 19 would hold the server's interpreter lock while it waits
    for the CPU)."""

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = priority()
    root = (await upload(client, SAMPLE)).json()["root"]
    await wait_for_analysis(client, root["id"])
    worker = background.pid
    assert worker is not None and worker != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, worker) == BACKGROUND_NICE
    assert Path(f"/proc/{worker}/status").read_text().count(f"PPid:\t{os.getpid()}\n") == 1
    # The event loop's thread and a worker thread of the server's pool are as they were.
    assert priority() == before
    assert await asyncio.to_thread(priority) == before


@pytest.mark.anyio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
async def test_an_analysis_process_killed_is_replaced_for_the_next_node(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    root = (await upload(client, SAMPLE)).json()["root"]
    await wait_for_analysis(client, root["id"])
    killed = background.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    later = await add_child(app, root["id"], seconds=2.0, seed=3)
    node = await wait_for_analysis(client, later.id)
    assert node["analysis"]["loudness_lufs"] is not None
    assert background.pid not in (None, killed)


async def wait_for_analysis(client: httpx.AsyncClient, node_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        node: dict[str, Any] = (await client.get(f"/api/nodes/{node_id}")).json()
        if node["analysis"] is not None:
            return node
        await asyncio.sleep(0.05)
    raise AssertionError(f"node {node_id} was not analysed")
