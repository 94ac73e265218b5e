"""Chain events: the hub's bounded fan-out, and the SSE stream over a real socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SAMPLE
from live import running_server
from sse import Message, open_stream

from sparrow.api.schemas import EVENT_DATA
from sparrow.events import (
    ChainDeleted,
    Event,
    EventHub,
    NodeProgress,
    NodesDeleted,
    NodeStatusChanged,
    SpineChanged,
    StemsProgress,
    StemsStatusChanged,
    StoredEvent,
)
from sparrow.models import NodeError, NodeStatus, StemsStatus
from sparrow.settings import Settings


def test_every_event_is_documented_by_the_schema_of_its_data() -> None:
    error = NodeError("interrupted", "The server stopped.")
    events: list[Event] = [
        NodeStatusChanged("c", "n", NodeStatus.READY),
        NodeStatusChanged("c", "n", NodeStatus.ERROR, error),
        NodeProgress("c", "n", 0.5, 1.25),
        NodeProgress("c", "n", 1.0),
        NodesDeleted("c", ("a", "b")),
        SpineChanged("c", ("a",)),
        ChainDeleted("c"),
        StemsStatusChanged("c", "n", StemsStatus.READY, stems=("drums", "bass")),
        StemsStatusChanged("c", "n", StemsStatus.ERROR, error),
        StemsProgress("c", "n", 0.25),
    ]
    for event in events:
        model = EVENT_DATA[event.name]
        data = event.data()
        assert model.model_validate(data).model_dump(exclude_unset=True) == data, event


# -- the hub ---------------------------------------------------------------------------


def stored(i: int, name: str = "node-status", chain: str = "c") -> StoredEvent:
    return StoredEvent(chain, i, name, {"i": i})


@pytest.mark.anyio
async def test_a_subscriber_that_falls_behind_loses_progress_first_then_is_cut_off() -> None:
    hub = EventHub(queue_limit=4)
    with hub.subscribe("c") as slow, hub.subscribe("other") as unrelated:
        hub.publish([stored(1), stored(2)])
        hub.publish([stored(3, "node-progress")])  # half full: progress is dropped
        assert len(slow) == 2 and not slow.ended
        hub.publish([stored(4), stored(5)])
        assert len(slow) == 4
        hub.publish([stored(6)])  # a status event that does not fit: cut off
        assert (slow.ended, slow.cut_off) == (True, True)
        assert await slow.next() is None  # the client recovers by replay, not from here
        assert not unrelated.ended and len(unrelated) == 0
    assert hub.subscriber_count() == 0


@pytest.mark.anyio
async def test_chain_deletion_and_close_end_subscriptions_after_their_events() -> None:
    hub = EventHub()
    with hub.subscribe("c") as sub, hub.subscribe("d") as other:
        hub.publish([stored(1), stored(2, "chain-deleted")])
        assert [(await sub.next()), (await sub.next())] == [stored(1), stored(2, "chain-deleted")]
        assert await sub.next() is None
        assert not other.ended
        hub.close()
        assert await other.next() is None
    with hub.subscribe("e") as late:  # after close, nothing waits for ever
        assert await late.next() is None


# -- the stream ------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", engine="mock", mock_step_ms=2)
    with running_server(settings) as base:
        yield base


def new_chain(base: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/api/chains", files={"file": ("s.flac", SAMPLE.read_bytes())})
    assert response.status_code == 201
    created: dict[str, Any] = response.json()
    return created


def branch(base: str, parent_id: str, **body: Any) -> list[str]:
    response = httpx.post(f"{base}/api/nodes/{parent_id}/branch", json=body)
    assert response.status_code == 202, response.text
    return [n["id"] for n in response.json()["nodes"]]


def settled_last_event_id(base: str, chain_id: str) -> int:
    """The chain's last event id once every node is analysed: the analyser's node-analysis
    events follow a node's ready, and nothing else writes to the log by itself."""
    deadline = time.monotonic() + 10
    while not all(
        n["analysis"] is not None
        for n in httpx.get(f"{base}/api/chains/{chain_id}").json()["nodes"]
    ):
        assert time.monotonic() < deadline, "the nodes were not analysed"
        time.sleep(0.02)
    # Read after the analyses: a read that saw them may have seen the chain's row before.
    last: int = httpx.get(f"{base}/api/chains/{chain_id}").json()["chain"]["last_event_id"]
    return last


def statuses(messages: list[Message], status: str) -> int:
    return sum(1 for m in messages if m.event == "node-status" and m.json["status"] == status)


def test_stream_shows_each_node_from_queued_to_ready(server: str) -> None:
    created = new_chain(server)
    with open_stream(server, created["chain"]["id"]) as stream:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-cache"
        assert stream.response.headers["x-accel-buffering"] == "no"
        ids = branch(server, created["root"]["id"], count=3, duration_s=1.5)
        messages = stream.collect(lambda m: statuses(m, "ready") == 3)
    assert stream.retry == 2000 and "connected" in stream.comments
    event_ids = [int(m.id or 0) for m in messages]
    assert event_ids == sorted(set(event_ids)) and event_ids[0] == 1
    for node_id in ids:
        mine = [m for m in messages if m.json["node_id"] == node_id]
        seen = [m.json["status"] for m in mine if m.event == "node-status"]
        assert seen == ["queued", "generating", "ready"]
        progress = [m.json["progress"] for m in mine if m.event == "node-progress"]
        assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 5
        first_progress = next(i for i, m in enumerate(mine) if m.event == "node-progress")
        assert mine[first_progress - 1].json["status"] == "generating"


def test_reconnect_with_last_event_id_gets_every_missed_event_once_in_order(
    server: str,
) -> None:
    created = new_chain(server)
    chain_id, root_id = created["chain"]["id"], created["root"]["id"]
    full: list[Message] = []
    done = threading.Event()

    def watch_everything() -> None:
        with open_stream(server, chain_id, query="?last_event_id=0") as stream:
            full.extend(stream.collect(lambda m: statuses(m, "ready") == 4))
        done.set()

    watcher = threading.Thread(target=watch_everything)
    watcher.start()
    with open_stream(server, chain_id, last_event_id="0") as stream:
        ids = branch(server, root_id, count=2, duration_s=2)
        before = stream.collect(lambda m: any(x.event == "node-progress" for x in m))
    # Dropped mid-generation; more happens while it is away.
    ids += branch(server, root_id, count=2, duration_s=0.5)
    assert done.wait(30)
    watcher.join(5)
    with open_stream(server, chain_id, last_event_id=before[-1].id) as stream:
        after = stream.collect(lambda m: m[-1].id == full[-1].id)
    assert [(m.id, m.event, m.data) for m in before + after] == [
        (m.id, m.event, m.data) for m in full
    ]
    assert statuses(full, "ready") == 4 and len(ids) == 4


def test_a_first_connection_resumes_from_the_chains_last_event_id(server: str) -> None:
    created = new_chain(server)
    chain_id = created["chain"]["id"]
    [node_id] = branch(server, created["root"]["id"], duration_s=0.5)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/api/nodes/{node_id}").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    last = settled_last_event_id(server, chain_id)
    assert last > 3
    with open_stream(server, chain_id, query=f"?last_event_id={last}") as stream:
        httpx.post(f"{server}/api/nodes/{node_id}/commit")
        [message] = stream.collect(lambda m: True)
    assert message.event == "spine-changed"
    assert int(message.id or 0) == last + 1
    # Only what changed: the root was committed already.
    assert message.json == {"chain_id": chain_id, "node_ids": [node_id], "committed": [node_id]}


@pytest.mark.parametrize("cursor", ["1", "abc", "-3", "99999", "1e3", "9" * 30, "9" * 5000])
def test_unknown_or_pruned_last_event_id_gets_a_reset(tmp_path: Path, cursor: str) -> None:
    settings = Settings(data_dir=tmp_path / "d", engine="mock", mock_step_ms=0, event_retention=5)
    with running_server(settings) as base:
        created = new_chain(base)
        chain_id = created["chain"]["id"]
        with open_stream(base, chain_id) as stream:
            branch(base, created["root"]["id"], count=2, duration_s=0.5)
            stream.collect(lambda m: statuses(m, "ready") == 2)
        last = settled_last_event_id(base, chain_id)
        assert last > 5  # event 1 is no longer in the log
        with open_stream(base, chain_id, last_event_id=cursor) as stream:
            [reset] = stream.collect(lambda m: True)
        assert reset.event == "reset" and reset.id == str(last)
        assert reset.json == {"chain_id": chain_id, "last_event_id": last}
        with open_stream(base, chain_id, last_event_id=str(last - 2)) as stream:
            replay = stream.collect(lambda m: len(m) == 2)
        assert [m.id for m in replay] == [str(last - 1), str(last)]


def test_keepalive_comments(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", engine="mock", sse_keepalive_s=0.2)
    with running_server(settings) as base:
        created = new_chain(base)
        with open_stream(base, created["chain"]["id"], read_timeout_s=3) as stream:
            started = time.monotonic()
            pings = 0
            for line in stream.lines:  # no events happen: only comments arrive
                pings += line.startswith(": ping")
                if pings == 2:
                    break
        assert pings == 2 and time.monotonic() - started < 2


def test_deleting_the_chain_ends_its_streams_after_chain_deleted(server: str) -> None:
    created = new_chain(server)
    chain_id = created["chain"]["id"]
    with open_stream(server, chain_id) as stream:
        assert httpx.delete(f"{server}/api/chains/{chain_id}").status_code == 204
        messages = list(stream)  # ends by itself
    # (The root's node-analysis comes first if it was analysed before the delete.)
    assert [m.event for m in messages if m.event != "node-analysis"] == ["chain-deleted"]
    assert messages[-1].json == {"chain_id": chain_id}
    assert httpx.get(f"{server}/api/chains/{chain_id}/events").status_code == 404


def test_streams_end_promptly_at_shutdown(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", engine="mock")
    messages: list[Message] = []
    with running_server(settings) as base:
        created = new_chain(base)
        opened = threading.Event()

        def listen() -> None:
            with open_stream(base, created["chain"]["id"]) as stream:
                opened.set()
                messages.extend(stream)

        listener = threading.Thread(target=listen)
        listener.start()
        assert opened.wait(10)
        time.sleep(0.2)
        started = time.monotonic()
    listener.join(10)
    assert not listener.is_alive()
    assert time.monotonic() - started < 5
    # The root's node-analysis may come first, depending on how soon it was analysed.
    assert [m.event for m in messages if m.event != "node-analysis"] == ["shutdown"]
    assert messages[-1].event == "shutdown" and messages[-1].id is None


def test_events_of_an_unknown_chain_are_404(server: str) -> None:
    response = httpx.get(f"{server}/api/chains/nope/events")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
