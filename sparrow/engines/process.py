"""The decoding loop in a process of its own (SPARROW_ENGINE_PROCESS).

Every torch operation releases the GIL while it computes and takes it back when it
ends. Beside a thread that is busy in Python — the server's event loop answering
requests, writing progress, reading FFmpeg's pipes, publishing the rows that just
finished — the decoding thread waits for the GIL after each of its hundreds of
operations per step, up to the interpreter's switch interval each time: an
8-row step of the tiny model takes 3.2 ms alone and 4.3–4.6 ms inside the server,
an Encodec decode 17 ms and 37–53 ms (``docs/performance.md``). vLLM runs its
engine core in a process of its own for the same reason. Here:

- ``DecodingProcess`` (this process) has the ``Batcher``'s face — ``submit``,
  ``rows``, ``close``, ``max_rows`` — and ``engine``, which answers ``load``,
  ``info``, ``sample_rate`` and ``channels`` for the model that lives only in the
  child (on a GPU, the child alone holds its memory);
- the child (``_serve``, started with ``spawn`` on first use) builds the engine
  and runs a ``Batcher`` over it: fairness, joining at step boundaries and the
  batch's failures are the ``Batcher``'s, unchanged;
- rows and their audio travel pickled over one pipe each way; the child sends the
  rows' fractions at most every ``PROGRESS_EVERY_S`` (and at once when a row is
  done), this process calls each row's progress callback with them and, when
  one raises ``Cancelled`` or a waiting row is no longer wanted, tells the child
  to drop that row (it leaves at the next step boundary);
- a child that dies (killed, out of memory) fails the rows it had with
  ``GenerationFailed``; the next ``load`` or ``submit`` starts a fresh one. A child
  ends as soon as its pipe does, so it never outlives the server's process, however
  that ends.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from sparrow.engines.base import (
    Audio,
    Cancelled,
    EngineInfo,
    GenerationEngine,
    Progress,
    Row,
    describe,
)
from sparrow.engines.batching import Batcher, RowView, report, settle, still_wanted
from sparrow.errors import EngineUnavailable, GenerationFailed, SparrowError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.01  # the child's progress messages, at most this often
START_TIMEOUT_S = 600.0  # a real model from a cold disk; the load itself is the engine's

EngineFactory = Callable[[], GenerationEngine]


@dataclass(eq=False)
class _Entry:
    """A row submitted to the child, as this process follows it."""

    progress: Progress
    wanted: Callable[[], bool]
    owner: str | None
    job_id: str
    node_id: str
    future: Future[Audio] = field(default_factory=Future)
    fraction: float = 0.0
    decoding: bool = False


@dataclass(frozen=True)
class _Model:
    info: EngineInfo
    sample_rate: int
    channels: int


class _Child:
    """One child process and the pipe to it; ``send`` never blocks its caller."""

    def __init__(self, factory: EngineFactory, max_rows: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process with threads
        self.conn, theirs = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(theirs, factory, max_rows),
            name="sparrow-decoder",
            daemon=True,
        )
        self.process.start()
        theirs.close()
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_all, name="sparrow-decoder-send", daemon=True
        )
        self._sender.start()

    def send(self, *message: Any) -> None:
        self._outbox.put(message)

    def _send_all(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader fails its rows
                return

    def end_sending(self) -> None:
        self._outbox.put(None)

    def stop(self, timeout_s: float) -> None:
        """Ask the child to finish (its rows end as their callbacks decide), then end it."""
        self.send("close", timeout_s)
        self.end_sending()
        self._sender.join(timeout_s)
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout_s)


class DecodingProcess:
    """A ``Batcher`` whose engine decodes in a child process; see the module docstring."""

    def __init__(self, factory: EngineFactory, max_rows: int, info: EngineInfo) -> None:
        """``factory`` builds the engine in the child (it must pickle); ``info`` describes
        it until the child has loaded it."""
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.factory = factory
        self.max_rows = max_rows
        self.engine = ProcessEngine(self, info)
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._keys = itertools.count()
        self._child: _Child | None = None
        self._model: Future[_Model] | None = None  # the child's answer to "load"
        self._closed = False

    # -- the Batcher's face ------------------------------------------------------------------

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
        entry = _Entry(progress, wanted, owner, job_id, node_id)
        with self._lock:
            if self._closed:
                settle(entry.future, Cancelled())
                return entry.future
            child = self._running()
            key = next(self._keys)
            self._entries[key] = entry
        child.send("submit", key, row, owner, job_id, node_id)
        return entry.future

    def rows(self) -> list[RowView]:
        with self._lock:
            entries = list(self._entries.values())
        return [
            RowView(e.job_id, e.node_id, e.owner, e.fraction, decoding=e.decoding)
            for decoding in (True, False)
            for e in entries
            if e.decoding is decoding
        ]

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop(timeout_s)
        self._fail_all(Cancelled())

    # -- the engine's face -------------------------------------------------------------------

    def load(self) -> _Model:
        """The child's model, loaded (once per child); EngineUnavailable if it cannot."""
        with self._lock:
            if self._closed:
                raise EngineUnavailable("The server is shutting down.")
            child = self._running()
            model = self._model
            if model is None:
                model = self._model = Future()
                child.send("load")
        try:
            return model.result(START_TIMEOUT_S)
        except TimeoutError:
            raise EngineUnavailable(
                f"The decoding process did not load its model within {START_TIMEOUT_S:g} s."
            ) from None

    # -- the pipe ----------------------------------------------------------------------------

    def _running(self) -> _Child:
        """The child, started if there is none (under the lock)."""
        if self._child is None:
            self._child = _Child(self.factory, self.max_rows)
            self._model = None
            threading.Thread(
                target=self._read, args=(self._child,), name="sparrow-decoder-read", daemon=True
            ).start()
        return self._child

    def _read(self, child: _Child) -> None:
        try:
            while True:
                self._on_message(child, child.conn.recv())
        except (EOFError, OSError):
            pass
        child.end_sending()
        child.process.join(5)
        with self._lock:  # the rows of this child only: a new one may start right after
            closing = self._closed or self._child is not child
            if self._child is child:
                self._child = None
            model, self._model = self._model, None
            entries, self._entries = list(self._entries.values()), {}
        if closing:
            exc: Exception = Cancelled()
        else:
            code = child.process.exitcode
            log.error("the decoding process ended (exit code %s); its rows fail", code)
            exc = GenerationFailed(f"The decoding process ended unexpectedly (exit code {code}).")
        self.engine.described = self.engine.unloaded
        if model is not None:
            reason = "The server is shutting down." if closing else str(exc)
            settle(model, EngineUnavailable(reason))
        for entry in entries:
            settle(entry.future, exc)
        child.conn.close()

    def _on_message(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "progress":
            self._on_progress(child, message[1])
        elif kind in ("done", "failed"):
            with self._lock:
                entry = self._entries.pop(message[1], None)
            if entry is not None:
                settle(entry.future, message[2])
        elif kind == "loaded":
            info, sample_rate, channels = message[1:]
            self.engine.described = info
            with self._lock:
                model = self._model
            if model is not None:
                settle(model, _Model(info, sample_rate, channels))
        elif kind == "load-failed":
            with self._lock:
                model, self._model = self._model, None  # the next load tries again
            if model is not None:
                settle(model, message[1])

    def _on_progress(self, child: _Child, fractions: dict[int, float]) -> None:
        """Each decoding row's progress callback; rows no longer wanted are dropped."""
        with self._lock:
            entries = list(self._entries.items())
        for key, entry in entries:
            if key in fractions:
                entry.fraction, entry.decoding = fractions[key], True
                stopped = report(entry.future, entry.progress, entry.fraction)
            elif entry.future.cancelled() or not (
                entry.decoding or still_wanted(entry.future, entry.wanted)
            ):
                stopped = Cancelled()
            else:
                continue
            if stopped is not None:
                with self._lock:
                    self._entries.pop(key, None)
                child.send("drop", key)
                settle(entry.future, stopped)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            settle(entry.future, exc)


class ProcessEngine:
    """The engine's face in this process: what the worker and ``/api/gpu`` ask of the model
    that decodes in the child."""

    def __init__(self, process: DecodingProcess, info: EngineInfo) -> None:
        self.process = process
        self.unloaded = info  # before a child has loaded the model
        self.described = info  # the child's latest description once it has loaded

    @property
    def sample_rate(self) -> int:
        return self.process.load().sample_rate

    @property
    def channels(self) -> int:
        return self.process.load().channels

    def info(self) -> EngineInfo:
        return self.described

    def load(self) -> None:
        self.process.load()


# -- the child ---------------------------------------------------------------------------------


def _serve(conn: Connection, factory: EngineFactory, max_rows: int) -> None:
    """The child's main thread: builds the engine, then follows the parent's messages until
    "close". The pipe ending before it means the parent is gone, however it ended: the
    child ends at once, in the middle of a step (nobody waits for its rows)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it says when to stop
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = factory()
    batcher = Batcher(engine, max_rows)
    reports = _Reports(conn)
    timeout_s = 5.0
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            kind = message[0]
            if kind == "submit":
                key, row, owner, job_id, node_id = message[1:]
                future = batcher.submit(
                    row,
                    reports.progress_of(key),
                    wanted=reports.wanted_of(key),
                    owner=owner,
                    job_id=job_id,
                    node_id=node_id,
                )
                future.add_done_callback(reports.result_of(key))
            elif kind == "drop":
                reports.drop(message[1])
            elif kind == "load":
                threading.Thread(target=reports.load, args=(engine,), daemon=True).start()
            elif kind == "close":
                timeout_s = message[1]
                break
    finally:
        batcher.close(timeout_s)
        conn.close()


class _Reports:
    """The child's side of the pipe: rows' progress, results and the model's description."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()  # one message at a time, from any thread
        self._rows_lock = threading.Lock()
        self._dropped: set[int] = set()
        self._fractions: dict[int, float] = {}
        self._sent_at = 0.0

    def send(self, *message: Any) -> None:
        # The parent gone, the main thread sees the pipe end.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)

    def drop(self, key: int) -> None:
        with self._rows_lock:
            self._dropped.add(key)
            self._fractions.pop(key, None)

    def wanted_of(self, key: int) -> Callable[[], bool]:
        return lambda: key not in self._dropped

    def progress_of(self, key: int) -> Progress:
        def progress(fraction: float) -> None:
            with self._rows_lock:
                if key in self._dropped:
                    raise Cancelled
                self._fractions[key] = fraction
                now = time.monotonic()
                if fraction < 1.0 and now - self._sent_at < PROGRESS_EVERY_S:
                    return
                self._sent_at = now
                fractions = dict(self._fractions)
            self.send("progress", fractions)

        return progress

    def result_of(self, key: int) -> Callable[[Future[Audio]], None]:
        def send_result(future: Future[Audio]) -> None:
            with self._rows_lock:
                self._fractions.pop(key, None)
                self._dropped.discard(key)  # never asked about again
            exc = future.exception()
            if exc is None:
                self.send("done", key, future.result())
            else:
                self.send("failed", key, _portable(exc))

        return send_result

    def load(self, engine: GenerationEngine) -> None:
        try:
            engine.load()
            self.send("loaded", engine.info(), engine.sample_rate, engine.channels)
        except Exception as exc:
            self.send("load-failed", _portable(exc))


def _portable(exc: BaseException) -> Exception:
    """``exc`` as an exception that pickles: Sparrow's own as they are, others described."""
    if isinstance(exc, (Cancelled, SparrowError)):
        return exc
    return GenerationFailed(describe(exc))
