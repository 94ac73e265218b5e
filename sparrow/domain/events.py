"""Following a chain's events: the log replayed from a client's position, then live.

A follower first subscribes, then reads the log, so nothing committed in
between is missed; live events at or below what was already given are
skipped, so nothing is given twice. A position that is older than the
retained log, in the future, or no position at all (``None``) gets one
``reset`` event carrying the current id: the client reloads the chain and
carries on from there. The SSE layer only serializes what ``follow`` yields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from sparrow.domain.chains import found_chain, shown
from sparrow.errors import NotFound
from sparrow.events import EventHub, StoredEvent, Subscription
from sparrow.models import Caller
from sparrow.store import ChainStore
from sparrow.store.events import EventLog


class Tracking(Protocol):
    async def track(self, chain_id: str) -> None:
        """Make sure this process's hub gets the chain's events from now on."""
        ...


class EventsService:
    def __init__(
        self, store: ChainStore, log: EventLog, hub: EventHub, feed: Tracking | None = None
    ) -> None:
        self.store = store
        self.log = log
        self.hub = hub
        self.feed = feed  # None: every event is written in this process (SQLite)

    async def last_id(self, caller: Caller, chain_id: str) -> int:
        """The chain's last event id (404 for an unknown chain or another owner's)."""
        found_chain(chain_id, await self.store.get_chain(chain_id, owner=caller.owner))
        window = await self.log.window(chain_id)
        if window is None:  # deleted meanwhile
            raise NotFound(f"There is no chain {shown(chain_id)}.")
        return window[1]

    @contextmanager
    def subscribe(
        self, chain_id: str, *, on_cut_off: Callable[[], None] | None = None
    ) -> Iterator[Subscription]:
        """The chain's live events, queued for one follower (see ``sparrow.events``)."""
        with self.hub.subscribe(chain_id, on_cut_off=on_cut_off) as sub:
            yield sub

    async def follow(
        self, sub: Subscription, chain_id: str, after: int | None
    ) -> AsyncIterator[StoredEvent]:
        """The retained events after ``after`` (None: not a usable id), then the live ones
        from ``sub`` until it ends; a ``reset`` first where the log cannot serve ``after``."""
        if self.feed is not None:
            await self.feed.track(chain_id)  # before the window: nothing between
        window = await self.log.window(chain_id)  # read after subscribing: nothing between
        if window is None:
            return
        oldest, last = window
        if after is None or after < oldest - 1 or after > last:
            given = last
            yield StoredEvent(
                chain_id, last, "reset", {"chain_id": chain_id, "last_event_id": last}
            )
        else:
            given = after
            for event in await self.log.after(chain_id, after):
                yield event
                given = event.id
        while (live := await sub.next()) is not None:
            if live.id > given:
                yield live
                given = live.id
