"""kill -9 during generation: after a restart nothing is left generating (SPEC §5, §6).

The real ``sparrow serve`` runs in a child process on 127.0.0.1 with the mock
engine at real time (``SPARROW_MOCK_STEP_MS=20``: a 10 s branch takes ~10 s).
Each round queues two branches, A then B, waits until A is generating with
progress, and kills the process with SIGKILL while B is still queued. The
restart (with a fast mock) must end A's nodes ``error``/``interrupted``, run B
to ``ready``, answer 409 for every node that is not ready and a complete WAV of
exactly ``frames`` for every one that is, leave no temporary file behind, keep
the database intact, and replay the event log from the last id seen before the
kill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from crashes import check_audio, integrity_ok, kill_9, mock_server
from helpers import SAMPLE
from probe import wav_frames
from sse import Message, open_stream

from sparrow.audio import write_wav
from sparrow.audio.atomic import temp_path_for
from sparrow.media import MediaStore

SLOW_STEP_MS = "20"  # one 20 ms frame per 20 ms: real time
FAST_STEP_MS = "1"
BRANCH_S = 10.0
SAMPLE_RATE = 32_000  # the mock engine's
KILL_AT = (0.0, 0.15, 0.3)  # A's progress past which each round's kill lands


def branch(client: httpx.Client, parent_id: str, seed: int) -> list[str]:
    response = client.post(
        f"/api/nodes/{parent_id}/branch", json={"count": 2, "duration_s": BRANCH_S, "seed": seed}
    )
    assert response.status_code == 202, response.text
    nodes = response.json()["nodes"]
    assert [n["status"] for n in nodes] == ["queued", "queued"]
    return [n["id"] for n in nodes]


def statuses_of(messages: list[Message], node_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in node_ids}
    for m in messages:
        if m.event == "node-status" and m.json["node_id"] in out:
            out[m.json["node_id"]].append(m.json["status"])
    return out


def progressed_past(messages: list[Message], node_ids: list[str], fraction: float) -> bool:
    return any(
        m.event == "node-progress"
        and m.json["node_id"] in node_ids
        and m.json["progress"] > fraction
        for m in messages
    )


@dataclass(frozen=True)
class Crash:
    chain_id: str
    job_a: list[str]  # running at the kill
    job_b: list[str]  # queued at the kill
    last_seen: int  # the last event id a client saw before the kill


def crash_while_generating(
    data_dir: Path, log: Path, parent_id: str | None, seed: int, kill_at: float
) -> Crash:
    """Branch twice from ``parent_id`` (from a new chain when None) and kill -9 the
    server once the first job's progress passed ``kill_at``."""
    with (
        # One job at a time: the second waits in the queue while the first runs.
        mock_server(data_dir, log, SLOW_STEP_MS, SPARROW_MAX_BATCH="1") as (proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        if parent_id is None:
            created = client.post(
                "/api/chains", files={"file": ("sample.flac", SAMPLE.read_bytes())}
            )
            assert created.status_code == 201, created.text
            parent_id = created.json()["root"]["id"]
        chain_id = client.get(f"/api/nodes/{parent_id}").json()["chain_id"]
        start_id = client.get(f"/api/chains/{chain_id}").json()["chain"]["last_event_id"]
        with open_stream(base, chain_id, last_event_id=str(start_id)) as stream:
            job_a = branch(client, parent_id, seed=seed)
            job_b = branch(client, parent_id, seed=seed + 50)
            seen = stream.collect(lambda got: progressed_past(got, job_a, kill_at), timeout_s=15)
            gpu = client.get("/api/gpu").json()
            nodes = {n: client.get(f"/api/nodes/{n}").json() for n in job_a + job_b}
            for node in nodes.values():
                check_audio(client, node)
            kill_9(proc)
    assert [m.id for m in seen] == [str(i) for i in range(start_id + 1, start_id + 1 + len(seen))]
    assert statuses_of(seen, job_a) == {n: ["queued", "generating"] for n in job_a}
    assert statuses_of(seen, job_b) == {n: ["queued"] for n in job_b}
    assert [nodes[n]["status"] for n in job_a] == ["generating", "generating"]
    assert [nodes[n]["status"] for n in job_b] == ["queued", "queued"]
    assert [r["node_ids"] for r in gpu["running"]] == [sorted(job_a)]
    # One row at a time: the job's progress is its two siblings' mean, the second at 0.
    assert gpu["running"][0]["progress"] > kill_at / 2
    assert gpu["queue_depth"] == 1
    return Crash(chain_id, job_a, job_b, int(seen[-1].id or 0))


def restart_and_check(data_dir: Path, log: Path, crash: Crash, interrupted: list[str]) -> None:
    """Restart fast; B must run to ready, ``interrupted`` stay ended, nothing partial show."""
    media = MediaStore(data_dir)
    chain_id, job_a, job_b = crash.chain_id, crash.job_a, crash.job_b
    with (
        mock_server(data_dir, log, FAST_STEP_MS) as (_proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        deadline = time.monotonic() + 20
        while True:
            nodes = {n: client.get(f"/api/nodes/{n}").json() for n in job_a + job_b}
            for node in nodes.values():
                check_audio(client, node)
            if all(nodes[n]["status"] == "ready" for n in job_b):
                break
            assert all(nodes[n]["status"] in ("queued", "generating", "ready") for n in job_b), (
                nodes
            )
            assert time.monotonic() < deadline, nodes
            time.sleep(0.02)

        detail = client.get(f"/api/chains/{chain_id}").json()
        by_id = {n["id"]: n for n in detail["nodes"]}
        for node in detail["nodes"]:
            assert node["status"] not in ("queued", "generating"), node
            check_audio(client, node)
        for node_id in interrupted:
            assert by_id[node_id]["status"] == "error"
            assert by_id[node_id]["error"]["code"] == "interrupted"
            assert by_id[node_id]["frames"] is None
        for node_id in job_b:
            assert by_id[node_id]["frames"] == BRANCH_S * SAMPLE_RATE
            assert by_id[node_id]["sample_rate"] == SAMPLE_RATE
        ready = {n["id"] for n in detail["nodes"] if n["status"] == "ready"}
        chain_dir = media.chain_dir(chain_id)
        assert sorted(p.name for p in chain_dir.iterdir()) == sorted(f"{n}.wav" for n in ready)
        for node_id in ready:
            content = media.node_audio(chain_id, node_id).read_bytes()
            assert wav_frames(content) == by_id[node_id]["frames"]
        assert list(media.tmp_dir.iterdir()) == []
        gpu = client.get("/api/gpu").json()
        assert gpu["running"] == [] and gpu["queue_depth"] == 0

        # The event log survived: everything after the last id seen, in order, once.
        done = {n: ["generating", "ready"] for n in job_b}
        with open_stream(base, chain_id, last_event_id=str(crash.last_seen)) as stream:
            replay = stream.collect(lambda got: statuses_of(got, job_b) == done, timeout_s=15)
    first = crash.last_seen + 1
    assert [m.id for m in replay] == [str(i) for i in range(first, first + len(replay))]
    assert detail["chain"]["last_event_id"] == int(replay[-1].id or 0)
    ends = [
        i for i, m in enumerate(replay) if m.event == "node-status" and m.json["node_id"] in job_a
    ]
    assert len(ends) == 2
    for i in ends:
        assert replay[i].json["status"] == "error"
        assert replay[i].json["error"]["code"] == "interrupted"
    b_events = [i for i, m in enumerate(replay) if m.json.get("node_id") in job_b]
    assert max(ends) < min(b_events)
    assert progressed_past(replay, job_b, 0.99)


def test_kill_during_generation_interrupts_running_and_runs_queued(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    media = MediaStore(data_dir)
    parent_id: str | None = None
    interrupted: list[str] = []  # every A node, over all rounds
    for round_, kill_at in enumerate(KILL_AT):
        crash = crash_while_generating(data_dir, log, parent_id, 100 * round_ + 1, kill_at)
        interrupted += crash.job_a
        integrity_ok(data_dir)
        # What a kill in the middle of writing files leaves: a temporary name in the
        # chain's folder, and an upload being received.
        partial = temp_path_for(media.node_audio(crash.chain_id, crash.job_a[0]))
        partial.write_bytes(b"RIFF\xff\xff\xff\x7fWAVEfmt ")
        (media.tmp_dir / f"upload-{round_}").write_bytes(b"half an upload")

        restart_and_check(data_dir, log, crash, interrupted)
        integrity_ok(data_dir)
        parent_id = crash.job_b[0]  # the next round continues from generated audio


def test_file_of_an_interrupted_node_is_not_kept(tmp_path: Path) -> None:
    """A kill between publishing a node's file and marking it ready leaves a complete
    file under the node's final name; the node ends interrupted, so the file is
    never served, and the start-up sweep should remove it."""
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    media = MediaStore(data_dir)
    with (
        # One job at a time: the second waits in the queue while the first runs.
        mock_server(data_dir, log, SLOW_STEP_MS, SPARROW_MAX_BATCH="1") as (proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        created = client.post("/api/chains", files={"file": ("sample.flac", SAMPLE.read_bytes())})
        assert created.status_code == 201, created.text
        chain_id = created.json()["chain"]["id"]
        node_ids = branch(client, created.json()["root"]["id"], seed=7)
        deadline = time.monotonic() + 15
        while client.get("/api/gpu").json()["running"] == []:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kill_9(proc)
    published = media.node_audio(chain_id, node_ids[0])
    write_wav(published, [0.0] * SAMPLE_RATE, SAMPLE_RATE)
    with (
        mock_server(data_dir, log, FAST_STEP_MS) as (_proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        node = client.get(f"/api/nodes/{node_ids[0]}").json()
        assert node["status"] == "error" and node["error"]["code"] == "interrupted"
        assert client.get(f"/api/nodes/{node_ids[0]}/audio").status_code == 409
    assert not published.exists()


def test_kill_while_two_jobs_decode_in_one_batch_interrupts_both(tmp_path: Path) -> None:
    """Two chains' jobs decode side by side (SPARROW_MAX_BATCH 8) when the server is
    killed: after the restart every one of their nodes is ended ``interrupted``, none is
    left generating, no partial file shows, and a new request on either chain runs."""
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    with (
        mock_server(data_dir, log, SLOW_STEP_MS) as (proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        roots = [
            client.post("/api/chains", files={"file": ("s.flac", SAMPLE.read_bytes())}).json()
            for _ in range(2)
        ]
        jobs = [branch(client, r["root"]["id"], seed=10 + i) for i, r in enumerate(roots)]
        deadline = time.monotonic() + 15
        while True:
            rows = client.get("/api/gpu").json()["batch"]["rows"]
            if sum(r["decoding"] and r["progress"] > 0.1 for r in rows) == 4:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.02)
        kill_9(proc)
    integrity_ok(data_dir)
    with (
        mock_server(data_dir, log, FAST_STEP_MS) as (_proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        for node_id in [n for job in jobs for n in job]:
            node = client.get(f"/api/nodes/{node_id}").json()
            assert node["status"] == "error" and node["error"]["code"] == "interrupted", node
            check_audio(client, node)
        again = branch(client, roots[1]["root"]["id"], seed=99)
        deadline = time.monotonic() + 20
        while (status := client.get(f"/api/nodes/{again[0]}").json()["status"]) != "ready":
            assert status in ("queued", "generating") and time.monotonic() < deadline, status
            time.sleep(0.02)
