"""Sparrow as a cluster, with real processes: a real PostgreSQL, ``sparrow serve`` replicas
and ``sparrow worker`` processes (mock engine), killed for real where the test says so."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Cluster, Process, running_cluster, wait_ready_node
from faults import upload_sample, wait_stems_ended, wait_until
from live import sparrow_env
from pg import PostgresServer
from sse import Message, open_stream

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(postgres: PostgresServer, tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(postgres.new_database(), tmp_path) as running:
        yield running


def branch(
    client: httpx.Client, parent_id: str, *, seed: int, duration_s: float = 2.0, count: int = 1
) -> list[dict[str, Any]]:
    response = client.post(
        f"/api/nodes/{parent_id}/branch",
        json={"prompt": "x", "duration_s": duration_s, "count": count, "seed": seed},
    )
    assert response.status_code == 202, response.text
    nodes: list[dict[str, Any]] = response.json()["nodes"]
    return nodes


def ready(node_id: str) -> Any:
    def check(messages: list[Message]) -> bool:
        return any(
            m.event == "node-status"
            and m.json["node_id"] == node_id
            and m.json["status"] == "ready"
            for m in messages
        )

    return check


def audio_sha256(client: httpx.Client, node_id: str) -> str:
    response = client.get(f"/api/nodes/{node_id}/audio")
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


def wait_progress(cluster: Cluster, chain_id: str, node_id: str) -> None:
    """Until the node has reported progress: its job is decoding."""
    base = cluster.replicas[-1].base or ""

    def progressed(messages: list[Message]) -> bool:
        return any(m.event == "node-progress" and m.json["node_id"] == node_id for m in messages)

    events_of(base, chain_id, progressed)


def decoding_on_a_worker(
    cluster: Cluster, client: httpx.Client, *, seed: int, duration_s: float
) -> tuple[str, dict[str, Any], Process]:
    """A new chain's one-node branch, once a worker decodes it: the chain's id, the node,
    and the worker."""
    chain_id, root = upload_sample(client)
    (node,) = branch(client, root["id"], seed=seed, duration_s=duration_s)
    worker = cluster.worker_started(chain_id)
    wait_progress(cluster, chain_id, node["id"])
    return chain_id, node, worker


def events_of(base: str, chain_id: str, until: Any, *, after: int = 0) -> list[Message]:
    with open_stream(base, chain_id, last_event_id=str(after)) as stream:
        return stream.collect(until, timeout_s=30)


def collect_in_thread(base: str, chain_id: str, until: Any, out: list[Message]) -> threading.Thread:
    def run() -> None:
        out.extend(events_of(base, chain_id, until))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_branch_through_one_replica_is_seen_live_and_identically_on_the_other(
    cluster: Cluster,
) -> None:
    a, b = cluster.replicas[0].base, cluster.replicas[1].base
    assert a is not None and b is not None
    with cluster.client(0) as client:
        chain_id, root = upload_sample(client)
        seen_a: list[Message] = []
        seen_b: list[Message] = []
        # Both streams are open before the branch: what they get is live, not replayed.
        with (
            open_stream(a, chain_id, last_event_id="1") as on_a,
            open_stream(b, chain_id, last_event_id="1") as on_b,
        ):
            (node,) = branch(client, root["id"], seed=7)
            started = time.monotonic()
            seen_a = on_a.collect(ready(node["id"]))
            seen_b = on_b.collect(ready(node["id"]))
        assert time.monotonic() - started < 15
    as_sent = [(m.id, m.event, m.data) for m in seen_a]
    assert as_sent == [(m.id, m.event, m.data) for m in seen_b]
    ids = [int(m.id) for m in seen_a if m.id is not None]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # in order, no gap
    assert {"node-status", "node-progress"} <= {m.event for m in seen_a}


def test_a_worker_killed_mid_job_is_replaced_and_the_node_ends_with_the_same_audio(
    cluster: Cluster,
) -> None:
    with cluster.client(0) as client:
        chain_id, root = upload_sample(client)
        (undisturbed,) = branch(client, root["id"], seed=11, duration_s=3)
        expected = wait_ready_node(client, undisturbed["id"])
        assert expected["status"] == "ready"

        starts = cluster.job_starts(chain_id)
        (node,) = branch(client, root["id"], seed=11, duration_s=3)
        victim = cluster.worker_started(chain_id, starts)
        wait_progress(cluster, chain_id, node["id"])
        victim.kill_9()
        killed = time.monotonic()
        # Until another worker takes it, the node stays generating.
        assert client.get(f"/api/nodes/{node['id']}").json()["status"] == "generating"
        survivor = next(w for w in cluster.workers if w is not victim)
        wait_until(lambda: "lost its worker" in survivor.text(), timeout_s=10, what="detection")
        assert time.monotonic() - killed < 3  # within SPARROW_WORKER_STALL_S
        done = wait_ready_node(client, node["id"], timeout_s=30)
        assert done["status"] == "ready", done
        assert audio_sha256(client, done["id"]) == audio_sha256(client, expected["id"])
        assert done["frames"] == expected["frames"]
    messages = events_of(cluster.replicas[1].base or "", chain_id, ready(node["id"]))
    ids = [int(m.id) for m in messages if m.id is not None]
    assert ids == list(range(1, len(ids) + 1))  # the whole log: no gap, nothing twice
    statuses = [
        m.json["status"]
        for m in messages
        if m.event == "node-status" and m.json["node_id"] == node["id"]
    ]
    assert statuses == ["queued", "generating", "ready"]  # generating throughout the retry


def test_sigterm_hands_the_running_job_back_at_once_and_the_worker_exits_0(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    # A long stall time: only a hand-back explains the job finishing elsewhere soon.
    with (
        running_cluster(
            postgres.new_database(), tmp_path, replicas=1, SPARROW_WORKER_STALL_S="60"
        ) as cluster,
        cluster.client(0) as client,
    ):
        _, node, victim = decoding_on_a_worker(cluster, client, seed=5, duration_s=3)
        victim.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert victim.proc.wait(10) == 0
        assert time.monotonic() - stopped < 5
        assert "handed back" in victim.text()
        done = wait_ready_node(client, node["id"], timeout_s=20)
        assert done["status"] == "ready"
        assert time.monotonic() - stopped < 20  # far less than the 60 s a stall would take
        assert len(audio_sha256(client, node["id"])) == 64


def test_a_client_of_a_killed_replica_resumes_on_the_other_with_every_event_once(
    cluster: Cluster,
) -> None:
    a, b = cluster.replicas[0].base, cluster.replicas[1].base
    assert a is not None and b is not None
    with cluster.client(1) as client:
        chain_id, root = upload_sample(client)
        (node,) = branch(client, root["id"], seed=3, duration_s=4)
        first: list[Message] = []
        with open_stream(a, chain_id, last_event_id="0") as on_a:
            first = on_a.collect(lambda got: any(m.event == "node-progress" for m in got))
            cluster.replicas[0].kill_9()
        last_id = first[-1].id
        assert last_id is not None
        rest = events_of(b, chain_id, ready(node["id"]), after=int(last_id))
    ids = [int(m.id) for m in [*first, *rest] if m.id is not None]
    assert ids == list(range(1, len(ids) + 1))


def test_queue_limits_hold_across_replicas(postgres: PostgresServer, tmp_path: Path) -> None:
    """No workers: every accepted job stays queued. Twelve requests through two replicas
    at once, each on a chain of its own (so that no chain's row lock orders them), against
    a limit of three: exactly three get in."""
    with running_cluster(
        postgres.new_database(), tmp_path, workers=0, SPARROW_QUEUE_LIMIT="3"
    ) as cluster:
        with cluster.client(0) as client:
            roots = [upload_sample(client)[1]["id"] for _ in range(12)]
        codes: list[int] = []

        def ask(i: int) -> None:
            with cluster.client(i % 2) as client:
                response = client.post(
                    f"/api/nodes/{roots[i]}/branch", json={"prompt": "x", "duration_s": 1}
                )
                codes.append(response.status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(codes) == [202] * 3 + [429] * 9
        with cluster.client(1) as client:
            assert client.get("/api/gpu").json()["queue_depth"] == 3


def test_two_replicas_starting_together_on_a_fresh_database_both_come_up(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    with running_cluster(postgres.new_database(), tmp_path, replicas=0, workers=0) as cluster:
        both = [cluster.spawn_replica(), cluster.spawn_replica()]
        for replica in both:
            cluster.wait_replica(replica)
        with cluster.client(0) as client:
            assert client.get("/api/chains").status_code == 200


def test_a_cancel_through_any_replica_stops_the_worker_within_a_step(cluster: Cluster) -> None:
    with cluster.client(0) as client, cluster.client(1) as other:
        # 10 s of audio: 5 s of decoding
        chain_id, node, _ = decoding_on_a_worker(cluster, client, seed=9, duration_s=10)
        # Any replica shows the job that runs on a worker.
        gpu = other.get("/api/gpu").json()
        (running,) = gpu["running"]
        assert (running["chain_id"], running["node_ids"]) == (chain_id, [node["id"]])
        assert [w["running"] for w in gpu["workers"]].count(True) == 1
        cancelled = other.post(f"/api/nodes/{node['id']}/cancel")
        assert cancelled.status_code == 200
        asked = time.monotonic()
        wait_until(
            lambda: not any(w["running"] for w in cluster.live_workers()),
            timeout_s=5,
            what="the workers to be idle",
        )
        assert time.monotonic() - asked < 2.5
        assert client.get(f"/api/nodes/{node['id']}").json()["status"] == "cancelled"


def test_a_worker_lost_on_the_last_attempt_ends_its_nodes_interrupted(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    with (
        running_cluster(
            postgres.new_database(), tmp_path, replicas=1, SPARROW_JOB_ATTEMPTS="1"
        ) as cluster,
        cluster.client(0) as client,
    ):
        _, node, victim = decoding_on_a_worker(cluster, client, seed=2, duration_s=4)
        victim.kill_9()
        done = wait_ready_node(client, node["id"], timeout_s=20)
        assert done["status"] == "error"
        assert done["error"]["code"] == "interrupted"
        survivor = next(w for w in cluster.workers if w is not victim)
        assert "lost its worker on its last attempt" in survivor.text()


def test_a_process_starting_while_a_job_runs_leaves_it_alone(cluster: Cluster) -> None:
    """No start-up ends another live process's work: a replica and a worker start while
    a job runs, and the job finishes where it runs."""
    with cluster.client(0) as client:
        chain_id, node, runner = decoding_on_a_worker(cluster, client, seed=4, duration_s=6)
        cluster.start_replica()
        cluster.start_worker()
        done = wait_ready_node(client, node["id"], timeout_s=30)
    assert done["status"] == "ready"
    assert cluster.job_starts(chain_id)[cluster.workers.index(runner)] == 1
    assert sum(cluster.job_starts(chain_id)) == 1  # it ran once, undisturbed


def test_the_database_password_never_shows(postgres: PostgresServer, tmp_path: Path) -> None:
    """The test server trusts local logins, so a password in the URL is ignored by it and
    must be by everything else too: logs, errors, /api/gpu, /readyz."""
    secret = "hunter2-never-shown"
    url = postgres.new_database().replace("sparrow@", f"sparrow:{secret}@")
    with (
        running_cluster(url, tmp_path, replicas=1, workers=1) as cluster,
        cluster.client(0) as client,
    ):
        _, root = upload_sample(client)
        (node,) = branch(client, root["id"], seed=1, duration_s=1)
        wait_ready_node(client, node["id"])
        pages = [client.get(path).text for path in ("/api/gpu", "/readyz", "/api/chains")]
        logs = [p.text() for p in [*cluster.replicas, *cluster.workers]]
    assert all(secret not in text for text in [*pages, *logs])


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unreachable_database_is_one_sentence_and_a_nonzero_exit(
    tmp_path: Path, command: str
) -> None:
    env = sparrow_env(
        SPARROW_DATA_DIR=str(tmp_path),
        SPARROW_ENGINE="mock",
        SPARROW_DATABASE_URL="postgresql://sparrow:hunter2@127.0.0.1:1/sparrow",
    )
    done = subprocess.run(
        [sys.executable, "-m", "sparrow", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("sparrow: Cannot connect to PostgreSQL at "), done.stderr
    assert "127.0.0.1:1" in lines[-1]
    assert "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_stems_run_on_a_worker_and_any_replica_shows_their_progress(cluster: Cluster) -> None:
    with cluster.client(0) as a, cluster.client(1) as b:
        _, root = upload_sample(a)  # 8 s: 400 steps of 10 ms
        assert a.post(f"/api/nodes/{root['id']}/stems").status_code == 202

        def separating_with_progress() -> dict[str, Any] | None:
            stems: dict[str, Any] = b.get(f"/api/nodes/{root['id']}/stems").json()
            progressed = stems["status"] == "separating" and (stems["progress"] or 0) > 0
            return stems if progressed else None

        during = wait_until(separating_with_progress, timeout_s=15, what="stems progress on B")
        assert 0 < during["progress"] < 1
        done = wait_stems_ended(b, root["id"])
    assert done["status"] == "ready" and done["progress"] == 1.0


def test_a_key_s_queue_limit_holds_across_replicas(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Auth on, two keys, a limit of two waiting jobs per key and no workers: eight
    requests of one key at once through both replicas get two places; the other key
    still gets its own two."""
    url = postgres.new_database()
    env = sparrow_env(SPARROW_DATABASE_URL=url, SPARROW_DATA_DIR=str(tmp_path / "data"))
    keys = []
    for _ in range(2):
        made = subprocess.run(
            [sys.executable, "-m", "sparrow", "keys", "create", "--tier", "paid"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        keys.append(made.stdout.strip().splitlines()[-1])
    with running_cluster(
        url, tmp_path, workers=0, SPARROW_AUTH="on", SPARROW_QUEUE_LIMIT_PER_OWNER="2"
    ) as cluster:

        def burst(key: str, n: int) -> list[int]:
            """``n`` requests of ``key`` at once, each on a chain of its own."""
            with cluster.client(0) as client:
                client.headers["Authorization"] = f"Bearer {key}"
                roots = [upload_sample(client)[1]["id"] for _ in range(n)]
            codes: list[int] = []

            def ask(i: int) -> None:
                with cluster.client(i % 2) as client:
                    response = client.post(
                        f"/api/nodes/{roots[i]}/branch",
                        json={"prompt": "x", "duration_s": 1},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    codes.append(response.status_code)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            return sorted(codes)

        assert burst(keys[0], 8) == [202] * 2 + [429] * 6
        assert burst(keys[1], 3) == [202] * 2 + [429]


def test_every_node_is_analysed_once_by_a_worker_and_announced_on_every_replica(
    cluster: Cluster,
) -> None:
    """The replicas run no analyser; one of the two workers claims each node, and its
    ``node-analysis`` event reaches a stream on either replica."""
    a, b = cluster.replicas[0].base, cluster.replicas[1].base
    assert a is not None and b is not None
    with cluster.client(0) as client:
        chain_id, root = upload_sample(client)
        (node,) = branch(client, root["id"], seed=3, duration_s=2)
        wait_ready_node(client, node["id"])

        def analysed(messages: list[Message]) -> bool:
            done = {m.json["node_id"] for m in messages if m.event == "node-analysis"}
            return {root["id"], node["id"]} <= done

        for base in (a, b):
            events_of(base, chain_id, analysed)
        shown = client.get(f"/api/nodes/{root['id']}").json()["analysis"]
        assert (round(shown["tempo_bpm"]), shown["key"]) == (130, "B major")  # the sample
        time.sleep(1.5)  # room for a second analysis, if both workers took one node
        log = events_of(b, chain_id, analysed)
        assert sum(m.event == "node-analysis" for m in log) == 2


def test_one_worker_runs_two_chains_jobs_at_once(postgres: PostgresServer, tmp_path: Path) -> None:
    """With the PostgreSQL queue a worker takes several jobs at once (SPARROW_MAX_BATCH),
    their rows in one batch: both show running, from its heartbeat, on a replica."""
    with (
        running_cluster(postgres.new_database(), tmp_path, replicas=1, workers=1) as cluster,
        cluster.client(0) as client,
    ):
        nodes = []
        for seed in (1, 2):
            _, root = upload_sample(client)
            (node,) = branch(client, root["id"], seed=seed, duration_s=10)
            nodes.append(node["id"])

        def both_running() -> bool:
            running = client.get("/api/gpu").json()["running"]
            ids = {n for job in running if job["progress"] > 0 for n in job["node_ids"]}
            return ids == set(nodes)

        wait_until(both_running, timeout_s=15, interval_s=0.05, what="both jobs to run")
        (worker,) = client.get("/api/gpu").json()["workers"]
        assert worker["running"] is True
        for node_id in nodes:
            assert wait_ready_node(client, node_id)["status"] == "ready"
