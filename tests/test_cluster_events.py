"""PostgreSQL in one process: the log feed behind every replica's streams, and the
job deferred in the request's transaction.

The feed publishes what the persisted log holds when a notification names a chain; a
listening connection that is lost (terminated here by PostgreSQL itself) is noticed,
re-established, and the log read again from the last id, so a follower misses nothing.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg
import pytest
from faults import upload_sample
from helpers import chain_with_root
from live import live_server
from pg import PostgresServer
from sse import open_stream

from sparrow.cluster import LISTENER_NAME, LogFeed, PostgresQueue
from sparrow.models import Job, JobKind, new_id, utc_now
from sparrow.services import running_services
from sparrow.settings import Settings


def terminate_listeners(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (LISTENER_NAME,),
        ).fetchall()
    return len(rows)


def test_a_lost_listener_is_reestablished_and_nothing_is_missed(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.new_database()
    settings = Settings(
        data_dir=tmp_path / "data",
        engine="mock",
        database_url=url,
        worker="on",
        mock_step_ms=5,
    )
    with live_server(settings) as server, httpx.Client(base_url=server.base, timeout=10) as client:
        chain_id, root = upload_sample(client)
        feed = server.call(lambda: server.app.state.services.events.feed)
        assert isinstance(feed, LogFeed)
        # Reads time out before a keepalive comes: a missed event fails, it does not hang.
        with open_stream(server.base, chain_id, last_event_id="0", read_timeout_s=8) as stream:
            response = client.post(
                f"/api/nodes/{root['id']}/branch",
                json={"prompt": "x", "duration_s": 1, "seed": 1},
            )
            assert response.status_code == 202
            (node,) = response.json()["nodes"]
            stream.collect(
                lambda got: any(
                    m.event == "node-status" and m.json["status"] == "ready" for m in got
                )
            )
            assert terminate_listeners(url) >= 1  # the feed's (and the worker's) listener
            # The last event is committed while nobody listens, and nothing follows it:
            # only the re-read after reconnecting can find it.
            assert client.post(f"/api/nodes/{node['id']}/commit").status_code == 200
            messages = stream.collect(
                lambda got: any(m.event == "spine-changed" for m in got), timeout_s=10
            )
        (changed,) = [m for m in messages if m.event == "spine-changed"]
        assert changed.json["committed"] == [node["id"]]
        assert server.call(lambda: feed._listener.reconnects) >= 1


@pytest.mark.anyio
async def test_a_rolled_back_request_leaves_no_job(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The job is deferred to procrastinate inside the request's transaction: when that
    transaction rolls back after the deferral, neither Sparrow's job row nor
    procrastinate's job exists; when it commits, both do."""
    url = postgres.new_database()
    settings = Settings(data_dir=tmp_path / "data", engine="mock", database_url=url, worker="off")
    async with running_services(settings) as services:
        queue = services.generation.jobs
        assert isinstance(queue, PostgresQueue)
        store = services.chains.store
        chain, root = chain_with_root()

        def job() -> Job:
            return Job(new_id(), chain.id, JobKind.GENERATE, {"parent_id": root.id}, utc_now())

        async with store.write() as w:
            await w.create_chain(chain, root)

        async def enqueue_then_fail() -> None:
            async with store.write() as w:
                await queue.enqueue(w, job())
                raise RuntimeError("the request fails after its job was deferred")

        with pytest.raises(RuntimeError):
            await enqueue_then_fail()
        assert await counts(url) == (0, 0)
        async with store.write() as w:
            await queue.enqueue(w, job())
        assert await counts(url) == (1, 1)


async def counts(url: str) -> tuple[int, int]:
    """(Sparrow's job rows, procrastinate's jobs)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        ours = await (await conn.execute("SELECT count(*) FROM jobs")).fetchone()
        theirs = await (await conn.execute("SELECT count(*) FROM procrastinate_jobs")).fetchone()
    assert ours is not None and theirs is not None
    return int(ours[0]), int(theirs[0])
