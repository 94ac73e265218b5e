"""An engine's progress callback, bridged from the engine's thread to the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from sparrow.engines import Cancelled
from sparrow.jobs import JobControl

# Progress is announced when it moved this much or this long has passed (SPEC §4).
PROGRESS_STEP = 0.05
PROGRESS_INTERVAL_S = 1.0
# How long a progress event waits for the database: a busy one skips it (the next one
# supersedes it) rather than hold up the writes that must happen.
PROGRESS_WAIT_S = 0.25

Announce = Callable[[float, float | None], Coroutine[Any, Any, None]]
"""Records progress (fraction, eta_s) as events; runs on the event loop."""

K = TypeVar("K")
V = TypeVar("V")


class Coalesced(Generic[K, V]):
    """Progress of many pieces written together: ``write`` gets every piece's latest
    value in one call, however many pieces reported since the last one (the rows of a
    batch report at the same step boundary). ``announce`` returns once its value is
    written; a piece that reports again meanwhile keeps only its latest value."""

    def __init__(self, write: Callable[[list[V]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: dict[K, V] = {}
        self._writing: asyncio.Future[None] | None = None

    async def announce(self, key: K, value: V) -> None:
        self._pending[key] = value
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._writing)

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # the other rows of the step report first
        while self._pending:
            values, self._pending = list(self._pending.values()), {}
            await self._write(values)


class ProgressReporter:
    """The engine's progress callback: runs in the engine's thread.

    It stops the work (``Cancelled``) once the job is cancelled or ``wanted()``
    says the piece in hand is no longer wanted, and announces throttled progress
    through the event loop.
    """

    def __init__(
        self,
        control: JobControl,
        loop: asyncio.AbstractEventLoop,
        announce: Announce,
        *,
        wanted: Callable[[], bool] = lambda: True,
        span: tuple[float, float] = (0.0, 1.0),
        piece: str | None = None,
    ) -> None:
        """``span``: the part of the whole job this piece covers, for the job's progress;
        ``piece``: a node whose work runs beside the job's others (a generation row): the
        job's progress is then the mean of its pieces'."""
        self.control = control
        self.piece = piece
        self.loop = loop
        self.announce = announce
        self.wanted = wanted
        self.span = span
        self.sent_fraction = 0.0
        self.sent_at = time.monotonic()
        self.started = time.monotonic()
        self.pending: list[Future[None]] = []

    def __call__(self, fraction: float) -> None:
        if self.control.cancel.is_set() or not self.wanted():
            raise Cancelled
        if self.piece is not None:
            pieces = self.control.piece_progress
            pieces[self.piece] = fraction
            self.control.progress = sum(pieces.values()) / len(pieces)
        else:
            low, high = self.span
            self.control.progress = low + (high - low) * fraction
        now = time.monotonic()
        due = fraction >= 1.0 or fraction - self.sent_fraction >= PROGRESS_STEP
        if not due and now - self.sent_at < PROGRESS_INTERVAL_S:
            return
        self.sent_fraction, self.sent_at = fraction, now
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        self.pending.append(
            asyncio.run_coroutine_threadsafe(self.announce(fraction, eta), self.loop)
        )

    async def flush(self) -> None:
        """Wait until every progress event sent so far is recorded (before the final status)."""
        if self.pending:
            await asyncio.gather(
                *(asyncio.wrap_future(f) for f in self.pending), return_exceptions=True
            )
