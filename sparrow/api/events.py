"""The chain's event stream: ``GET /api/chains/{chain_id}/events`` (SPEC §4).

A stream first subscribes, then reads the log, so nothing committed in between
is missed; live events at or below what was already sent are skipped, so
nothing is sent twice. Where it starts:

- ``Last-Event-ID`` (or ``?last_event_id=``, for a first connection, since
  ``EventSource`` cannot set headers): every retained event after that id,
  then live events. An id that is older than the retained log, in the future,
  or not an id at all gets one ``reset`` event carrying the current id: the
  client reloads the chain and carries on from there.
- neither: the events from the moment of the request on.

The stream ends when the chain is deleted (after ``chain-deleted``), when the
subscriber fell too far behind (it reconnects with ``Last-Event-ID`` and
receives what it missed), and at server shutdown, after a ``shutdown`` event
that has no id, so the client's position is unchanged.

A client that takes no bytes blocks the stream's writes once the socket's buffers
are full, while its events pile up in its subscription. When they overflow it,
the response is ended at once (after ``CUT_OFF_GRACE_S``, should the write get
through and the stream end by itself) rather than left blocked until
``SEND_TIMEOUT_S``; a write still waiting after that also ends the response
(within half as long again: a watchdog looks every ``SEND_TIMEOUT_S / 2``).
Either way the subscription goes, and nothing more is held for that client than
what the server had already accepted to write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from sparrow.api.deps import CallerDep, Chains, Events, Keys, SettingsDep, StreamCallerDep
from sparrow.api.errors import responses
from sparrow.api.routing import api_router
from sparrow.api.schemas import StreamToken
from sparrow.events import Subscription

log = logging.getLogger(__name__)

router = api_router("events")

RETRY_MS = 2000  # how soon a browser reconnects after the stream drops
SEND_TIMEOUT_S = 30  # a client that takes no bytes this long is disconnected
SHUTDOWN_GRACE_S = 1.0
CUT_OFF_GRACE_S = 1.0  # a subscriber cut off for falling behind: then its response ends

_STREAM = {
    "description": "Server-Sent Events: `node-status`, `node-progress`, `node-analysis`, "
    "`node-deleted`, "
    "`spine-changed`, `stems-status`, `stems-progress`, `chain-deleted`, `reset` "
    "(reload the chain), and `shutdown` (the server stops; reconnect). Every event but "
    "`shutdown` has an integer `id`; the data is JSON.",
    "content": {"text/event-stream": {}},  # each event is described in sparrow.api.openapi
}


@router.get(
    "/chains/{chain_id}/events",
    summary="The chain's events, live (Server-Sent Events)",
    description="Reconnect with `Last-Event-ID` (browsers do) to receive every missed "
    "event in order, exactly once; a first connection can pass `?last_event_id=` "
    "(the chain's `last_event_id`). Keepalive comments every 15 s.",
    response_class=EventSourceResponse,
    responses={200: _STREAM, **responses(404)},
)
async def chain_events(
    chain_id: str,
    request: Request,
    caller: StreamCallerDep,
    events: Events,
    settings: SettingsDep,
    last_event_id: Annotated[
        str | None, Query(max_length=40, description="Where to resume.")
    ] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    last = await events.last_id(caller, chain_id)  # 404 for another owner's chain
    cursor = last_event_id_header if last_event_id_header is not None else last_event_id
    # Without a cursor the stream starts at this request: the events committed before
    # the stream subscribes (its headers are already on their way) are replayed.
    resume_after = last if cursor is None else _parse_id(cursor)
    shutdown = anyio.Event()
    cut_off = anyio.Event()

    async def stream() -> AsyncIterator[ServerSentEvent | bytes]:
        with events.subscribe(chain_id, on_cut_off=cut_off.set) as sub:
            stopper = asyncio.create_task(_end_on(shutdown, sub))
            try:
                yield ServerSentEvent(comment="connected", retry=RETRY_MS)
                async for event in events.follow(sub, chain_id, resume_after):
                    yield event.frame
                if shutdown.is_set():
                    yield ServerSentEvent(
                        data=json.dumps({"reason": "the server is shutting down"}),
                        event="shutdown",
                        retry=RETRY_MS,
                    )
            finally:
                stopper.cancel()

    return _Stream(
        stream(),
        cut_off=cut_off,
        headers={"Cache-Control": "no-cache"},
        ping=settings.sse_keepalive_s,
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


@router.post(
    "/chains/{chain_id}/stream-token",
    summary="A short-lived token for the chain's event stream",
    description="For clients that cannot send `Authorization` (a browser's `EventSource`): "
    "open `/api/chains/{chain_id}/events?token=…` within `expires_in_s`. The token opens "
    "only this chain's stream, and stops working when the key is revoked. With auth off, "
    "`token` is null: the stream needs none.",
    responses=responses(404),
)
async def stream_token(chain_id: str, caller: CallerDep, chains: Chains, keys: Keys) -> StreamToken:
    await chains.get_chain(caller, chain_id)  # 404 for another owner's chain
    issued = await keys.stream_token(caller, chain_id)
    if issued is None:
        return StreamToken(token=None, expires_in_s=None)
    return StreamToken(token=issued[0], expires_in_s=issued[1])


class _Stream(EventSourceResponse):
    """An event stream that also ends when its subscriber is cut off or stops taking bytes.

    A write still waiting after ``SEND_TIMEOUT_S`` ends the stream: a watchdog looks at the
    write in progress every half of that. sse-starlette's own ``send_timeout`` arms a
    deadline, a timer in the event loop, around every write instead; an event fanned out
    to 500 subscribers arms and cancels 500 of them (p99 at 500 subscribers: 39–41 ms
    with it, 27–34 ms without, ``python -m bench --only sse``)."""

    def __init__(self, *args: Any, cut_off: anyio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cut_off = cut_off
        self.writing_since: float | None = None  # when the write in progress began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            self.writing_since = time.monotonic()
            try:
                await send(message)
            finally:
                self.writing_since = None

        async with anyio.create_task_group() as tasks:

            async def end_when_cut_off() -> None:
                await self.cut_off.wait()
                await anyio.sleep(CUT_OFF_GRACE_S)
                log.info("event stream %s ended: the client fell behind", scope["path"])
                tasks.cancel_scope.cancel()  # its write is stuck: stop waiting for it

            async def end_when_stuck() -> None:
                while True:
                    await anyio.sleep(SEND_TIMEOUT_S / 2)
                    since = self.writing_since
                    if since is not None and time.monotonic() - since >= SEND_TIMEOUT_S:
                        log.info("event stream %s ended: the client took no bytes", scope["path"])
                        tasks.cancel_scope.cancel()
                        return

            tasks.start_soon(end_when_cut_off)
            tasks.start_soon(end_when_stuck)
            await super().__call__(scope, receive, timed_send)
            tasks.cancel_scope.cancel()


def _parse_id(value: str | None) -> int | None:
    """An event id, or None for anything that cannot be one (ids fit in 63 bits)."""
    value = (value or "").strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        return None
    return int(value)


async def _end_on(shutdown: anyio.Event, sub: Subscription) -> None:
    await shutdown.wait()
    sub.end()
