"""Batching across requests: rows of many jobs, chains and owners decoded as one batch.

The ``Batcher`` owns the generation engine in a thread of its own. Jobs
``submit`` one row per sibling (from the event loop) and get a future of its
audio; the thread keeps one ``Batch`` of the engine's in flight and, at every
step boundary:

- drops waiting rows that are no longer wanted (cancelled, deleted, a shutdown);
- lets waiting rows join, up to ``max_rows`` in flight — at any step boundary where
  the batch ``joins_midway`` (continuous batching), otherwise while it is empty —
  taken fairly: the row of the owner with the fewest rows in flight first, then of
  the job with the fewest, then the oldest, so one owner's eight siblings do not
  hold seven other musicians' single requests back;
- steps the batch, reports each row's progress through its own callback (which may
  raise ``Cancelled``: that row leaves, the others carry on), and resolves the
  future of each row that finished as soon as the batch gives it (Sparrow's loop
  gives one row's audio before it decodes the next one's).

A failure of the batch itself (the device ran out of memory) fails the rows in
flight, never the thread: the next rows get a fresh batch. ``decode_alone`` runs
one request through an engine's batch in the caller's thread, which is what every
engine's ``generate`` is.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sparrow.engines.base import (
    Audio,
    Batch,
    Cancelled,
    Continuation,
    GenerationEngine,
    Progress,
    Row,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def rows_of(request: Continuation) -> list[Row]:
    """One row per sibling of a request."""
    return [
        Row(request.context, prompt, seed, request.sampling)
        for prompt, seed in zip(request.prompts, request.seeds, strict=True)
    ]


def decode_alone(batch: Batch, request: Continuation, progress: Progress) -> list[Audio]:
    """Every sibling of ``request`` through ``batch`` (empty), to the end, in this thread;
    ``progress`` gets the siblings' mean fraction and may raise ``Cancelled``."""
    rows = rows_of(request)
    for row in rows:
        batch.add(row)
    made: dict[int, Audio] = {}

    def on_step() -> None:
        progress(sum(r.fraction for r in rows) / len(rows))

    while len(made) < len(rows):
        for row, audio in batch.step(on_step):
            made[id(row)] = audio
    return [made[id(row)] for row in rows]


@dataclass(eq=False)
class Entry:
    """A submitted row: who it is for, and how it reports."""

    row: Row
    progress: Progress  # after each step; may raise Cancelled to drop the row
    wanted: Callable[[], bool]  # checked while the row waits to join
    owner: str | None
    job_id: str
    node_id: str
    order: int
    future: Future[Audio] = field(default_factory=Future)


@dataclass(frozen=True)
class RowView:
    """A row, as ``/api/gpu`` shows it."""

    job_id: str
    node_id: str
    owner: str | None
    progress: float  # 0..1
    decoding: bool  # in the batch; False: waiting to join


class RowDecoder(Protocol):
    """Where a process's generation rows decode: a ``Batcher`` in a thread of this
    process, or one in a process of its own (``sparrow.engines.process``)."""

    max_rows: int

    def submit(
        self,
        row: Row,
        progress: Progress,
        *,
        wanted: Callable[[], bool] = ...,
        owner: str | None = None,
        job_id: str = "",
        node_id: str = "",
    ) -> Future[Audio]:
        """Queue ``row``; its future holds its audio, or the exception that ended it."""
        ...

    def rows(self) -> list[RowView]:
        """The rows decoding, then those waiting to join."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new rows, end the waiting ones ``Cancelled``, let the step in hand end."""
        ...


class Batcher:
    """Decodes the rows of many requests as one batch; see the module docstring."""

    def __init__(self, engine: GenerationEngine, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.engine = engine
        self.max_rows = max_rows
        self._lock = threading.Condition()
        self._waiting: list[Entry] = []
        self._live: list[Entry] = []
        self._order = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side -----------------------------------------------------------

    def submit(
        self,
        row: Row,
        progress: Progress,
        *,
        wanted: Callable[[], bool] = lambda: True,
        owner: str | None = None,
        job_id: str = "",
        node_id: str = "",
    ) -> Future[Audio]:
        """Queue ``row``; its future holds its audio, or the exception that ended it
        (``Cancelled`` for a row no longer wanted)."""
        entry = Entry(row, progress, wanted, owner, job_id, node_id, next(self._order))
        with self._lock:
            if self._closed:
                settle(entry.future, Cancelled())
                return entry.future
            self._waiting.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sparrow-batcher", daemon=True
                )
                self._thread.start()
            self._lock.notify()
        return entry.future

    def rows(self) -> list[RowView]:
        """The rows decoding, then those waiting to join."""
        with self._lock:
            return [
                RowView(e.job_id, e.node_id, e.owner, e.row.fraction, decoding=live)
                for entries, live in ((self._live, True), (self._waiting, False))
                for e in entries
            ]

    def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new rows, end the waiting ones ``Cancelled``, and let the thread finish
        the step it is in (the rows in flight end as their progress callbacks decide)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._lock.notify()
            thread = self._thread
        for entry in waiting:
            settle(entry.future, Cancelled())
        if thread is not None:
            thread.join(timeout_s)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        batch: Batch | None = None
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._live:
                    self._lock.wait()
                if self._closed and not self._live:
                    return
            if batch is None:
                try:
                    batch = self.engine.batch()
                except Exception as exc:  # the model cannot load: every waiting row says why
                    self._fail_waiting(exc)
                    continue
            self._admit(batch)
            if not len(batch):
                continue
            try:
                # Each finished row is settled as the batch gives it: its audio goes on to
                # be published while the next row's is still being made.
                for row, audio in batch.step(functools.partial(self._on_step, batch)):
                    entry = self._take_live(row)
                    if entry is not None:
                        settle(entry.future, audio)
            except Exception as exc:
                if not isinstance(exc, Cancelled):
                    log.exception("a decoding batch failed; its %d row(s) fail", len(self._live))
                self._end_live(exc)
                batch = None  # its state is unknown: the next rows get a fresh one

    def _admit(self, batch: Batch) -> None:
        """Let waiting rows join, fairly, while there is room."""
        while True:
            with self._lock:
                entry = self._next(batch)
                if entry is None:
                    return
            try:
                batch.add(entry.row)
            except Exception as exc:  # this row cannot be decoded (its context, its text)
                settle(entry.future, exc)
                continue
            with self._lock:
                self._live.append(entry)

    def _next(self, batch: Batch) -> Entry | None:
        """The waiting row to join next, taken out of the waiting list (under the lock)."""
        for entry in [e for e in self._waiting if not still_wanted(e.future, e.wanted)]:
            self._waiting.remove(entry)
            settle(entry.future, Cancelled())
        if len(batch) >= self.max_rows or (len(batch) and not batch.joins_midway):
            return None
        candidates = [e for e in self._waiting if batch.fits(e.row)]
        if not candidates:
            return None
        owners = Counter(e.owner for e in self._live)
        jobs = Counter(e.job_id for e in self._live)
        chosen = min(candidates, key=lambda e: (owners[e.owner], jobs[e.job_id], e.order))
        self._waiting.remove(chosen)
        return chosen

    def _on_step(self, batch: Batch) -> None:
        """Each row's progress; a row whose callback raises leaves. Stops the batch when
        no row is left and the batch cannot take new ones midway."""
        for entry in list(self._live):
            stopped = report(entry.future, entry.progress, entry.row.fraction)
            if stopped is not None:
                batch.remove(entry.row)
                self._take_live(entry.row)
                settle(entry.future, stopped)
        if not self._live and not batch.joins_midway:
            raise Cancelled

    def _take_live(self, row: Row) -> Entry | None:
        with self._lock:
            for entry in self._live:
                if entry.row is row:
                    self._live.remove(entry)
                    return entry
        return None

    def _end_live(self, exc: BaseException) -> None:
        with self._lock:
            live, self._live = self._live, []
        for entry in live:
            settle(entry.future, exc)

    def _fail_waiting(self, exc: BaseException) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for entry in waiting:
            settle(entry.future, exc)


def still_wanted(future: Future[Audio], wanted: Callable[[], bool]) -> bool:
    """Whether a waiting row is still wanted: its caller still waits for its future, and
    ``wanted()`` says so (a ``wanted`` that raises says no)."""
    if future.cancelled():  # its caller stopped waiting
        return False
    try:
        return wanted()
    except Exception:
        return False


def report(future: Future[Audio], progress: Progress, fraction: float) -> Cancelled | None:
    """A decoding row's ``fraction`` through its ``progress`` callback; the ``Cancelled``
    that ends the row (its caller stopped waiting, or the callback raised: a callback that
    broke ends its own row only), or None while it goes on."""
    try:
        if future.cancelled():
            raise Cancelled
        progress(fraction)
    except Exception as exc:
        return exc if isinstance(exc, Cancelled) else Cancelled()
    return None


def settle(future: Future[T], outcome: T | BaseException) -> None:
    """Resolve a future, unless its caller already cancelled it."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass  # cancelled meanwhile: nobody waits for it
