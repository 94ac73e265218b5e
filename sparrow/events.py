"""Chain events: typed values, and the hub that fans them out to subscribers.

An event is written to the chain's log (``events`` table) in the same
transaction as the change it describes, and takes the chain's next event id
there. Once that transaction commits, the store hands the stored events to
``EventHub.publish``, still holding the write lock, so subscribers receive
events in id order.

Each subscriber has a bounded queue. When a subscriber falls behind, progress
events are dropped for it first (a later one supersedes them); when even a
status event does not fit, the subscriber is cut off: its queue is dropped,
``on_cut_off`` lets the stream end its connection at once (its writes may be
stuck behind a client that takes no bytes), and the client recovers every
missed event through ``Last-Event-ID``. A slow client never slows the server or
the other clients.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from sparrow.models import NodeError, NodeStatus, StemsStatus

# -- the events ---------------------------------------------------------------------


def _status_data(
    node_id: str, chain_id: str, status: NodeStatus | StemsStatus, error: NodeError | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"node_id": node_id, "chain_id": chain_id, "status": status.value}
    if error is not None:
        out["error"] = {"code": error.code, "detail": error.detail}
    return out


@dataclass(frozen=True)
class NodeStatusChanged:
    name: ClassVar[str] = "node-status"
    chain_id: str
    node_id: str
    status: NodeStatus
    error: NodeError | None = None

    def data(self) -> dict[str, Any]:
        return _status_data(self.node_id, self.chain_id, self.status, self.error)


@dataclass(frozen=True)
class NodeProgress:
    name: ClassVar[str] = "node-progress"
    chain_id: str
    node_id: str
    progress: float
    eta_s: float | None = None

    def data(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "chain_id": self.chain_id,
            "progress": round(self.progress, 4),
        }
        if self.eta_s is not None:
            out["eta_s"] = round(self.eta_s, 2)
        return out


@dataclass(frozen=True)
class NodeAnalysed:
    name: ClassVar[str] = "node-analysis"
    chain_id: str
    node_id: str
    analysis: dict[str, Any]

    def data(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "chain_id": self.chain_id, "analysis": self.analysis}


@dataclass(frozen=True)
class NodesDeleted:
    name: ClassVar[str] = "node-deleted"
    chain_id: str
    node_ids: tuple[str, ...]

    def data(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "node_ids": list(self.node_ids)}


@dataclass(frozen=True)
class SpineChanged:
    """The nodes whose ``committed`` flag changed: the event stays small however long the
    spine (a commit at the tail of a 20,000-node spine changes one node)."""

    name: ClassVar[str] = "spine-changed"
    chain_id: str
    committed: tuple[str, ...]  # now committed, root side first
    uncommitted: tuple[str, ...] = ()  # no longer committed

    def data(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "node_ids": [*self.committed, *self.uncommitted],
            "committed": list(self.committed),
        }


@dataclass(frozen=True)
class ChainDeleted:
    name: ClassVar[str] = "chain-deleted"
    chain_id: str

    def data(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id}


@dataclass(frozen=True)
class StemsStatusChanged:
    name: ClassVar[str] = "stems-status"
    chain_id: str
    node_id: str
    status: StemsStatus
    error: NodeError | None = None
    stems: tuple[str, ...] = ()  # the stem names, once ready

    def data(self) -> dict[str, Any]:
        out = _status_data(self.node_id, self.chain_id, self.status, self.error)
        if self.stems:
            out["stems"] = list(self.stems)
        return out


@dataclass(frozen=True)
class StemsProgress:
    name: ClassVar[str] = "stems-progress"
    chain_id: str
    node_id: str
    progress: float
    eta_s: float | None = None

    def data(self) -> dict[str, Any]:
        return NodeProgress(self.chain_id, self.node_id, self.progress, self.eta_s).data()


Event = (
    NodeStatusChanged
    | NodeProgress
    | NodeAnalysed
    | NodesDeleted
    | SpineChanged
    | ChainDeleted
    | StemsStatusChanged
    | StemsProgress
)

# Events that may be dropped for a subscriber that falls behind: a later one
# carries the same information.
DROPPABLE = frozenset({NodeProgress.name, StemsProgress.name})


@dataclass(frozen=True)
class StoredEvent:
    """An event as it sits in the log: the chain's id for it, its name, its JSON data."""

    chain_id: str
    id: int
    name: str
    data: dict[str, Any]

    @cached_property
    def data_json(self) -> str:
        """The data as JSON, encoded once for the log and every subscriber's stream."""
        return json.dumps(self.data)

    @cached_property
    def frame(self) -> bytes:
        """The event as a Server-Sent Events frame (``id``, ``event``, ``data``), encoded
        once for every subscriber's stream rather than once per stream."""
        from sse_starlette import ServerSentEvent  # here: workers, which never stream, skip it

        return ServerSentEvent(data=self.data_json, event=self.name, id=str(self.id)).encode()


# -- fan-out ------------------------------------------------------------------------


@dataclass(eq=False)
class Subscription:
    """One stream's bounded queue of events of one chain."""

    chain_id: str
    limit: int
    on_cut_off: Callable[[], None] | None = None
    _items: deque[StoredEvent] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    cut_off: bool = False  # ended because it fell behind, not because the chain or server ended

    def offer(self, event: StoredEvent) -> None:
        if self.ended:
            return
        if event.name in DROPPABLE and len(self._items) >= self.limit // 2:
            return  # keep room for the events that must not be lost
        if len(self._items) >= self.limit:
            self.cut_off = True
            self._items.clear()  # never sent now: the client replays them from the log
            self.end()
            if self.on_cut_off is not None:
                self.on_cut_off()
            return
        self._items.append(event)
        self._wake.set()

    def end(self) -> None:
        self.ended = True
        self._wake.set()

    async def next(self) -> StoredEvent | None:
        """The next event; None once the subscription has ended (the queue is dropped)."""
        while not self._items:
            if self.ended:
                return None
            self._wake.clear()
            await self._wake.wait()
        if self.cut_off:
            return None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class EventHub:
    def __init__(self, queue_limit: int = 256) -> None:
        self.queue_limit = queue_limit
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self.closed = False

    @contextmanager
    def subscribe(
        self, chain_id: str, *, on_cut_off: Callable[[], None] | None = None
    ) -> Iterator[Subscription]:
        """A subscription for the block; ``on_cut_off`` is called if it falls behind."""
        sub = Subscription(chain_id, self.queue_limit, on_cut_off)
        if self.closed:
            sub.end()
        self._subscribers[chain_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(chain_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[chain_id]

    def publish(self, events: Sequence[StoredEvent]) -> None:
        """Hand committed events to their chains' subscribers; never blocks."""
        for event in events:
            for sub in list(self._subscribers.get(event.chain_id, ())):
                sub.offer(event)
            if event.name == ChainDeleted.name:
                self.end_chain(event.chain_id)

    def end_chain(self, chain_id: str) -> None:
        for sub in self._subscribers.get(chain_id, ()):
            sub.end()

    def close(self) -> None:
        """End every stream (server shutdown)."""
        self.closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.end()

    def queued(self, chain_id: str) -> list[int]:
        """How many events wait in each of the chain's subscriptions (none above the limit)."""
        return [len(sub) for sub in self._subscribers.get(chain_id, ())]

    def subscriber_count(self, chain_id: str | None = None) -> int:
        if chain_id is not None:
            return len(self._subscribers.get(chain_id, ()))
        return sum(len(s) for s in self._subscribers.values())
