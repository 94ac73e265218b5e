"""Readiness: whether a request would work now, checked the way a request would use it.

``/readyz`` is what a load balancer asks before sending traffic, so each check
does a little of what requests do: a write to the database (on its own
connection, with a short lock timeout), a small file written and fsynced in the
data dir, a real FFmpeg run whose output is compared with what it must be
(``sparrow.audio.canary``), and the worker's task alive. The checks run
together and their answer is kept for ``CACHE_S``, so probing often is cheap;
a fault is seen within that time, and so is its end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from sparrow.audio.canary import ffmpeg_problem
from sparrow.media import MediaStore
from sparrow.store import Database

CACHE_S = 2.0


@dataclass(frozen=True)
class Readiness:
    problems: dict[str, str | None] = field(default_factory=dict)
    """Each check's name, and None where it passed or a sentence saying why it failed."""

    @property
    def ready(self) -> bool:
        return all(problem is None for problem in self.problems.values())


class HealthService:
    def __init__(
        self,
        db: Database,
        media: MediaStore,
        *,
        ffmpeg: str | None,
        worker_alive: Callable[[], bool],
    ) -> None:
        self.db = db
        self.media = media
        self.ffmpeg = ffmpeg
        self._worker_alive = worker_alive
        self._last: tuple[float, Readiness] | None = None

    async def readiness(self) -> Readiness:
        if self._last is not None and time.monotonic() - self._last[0] < CACHE_S:
            return self._last[1]
        database, storage, ffmpeg = await asyncio.gather(
            self.db.probe_write(),
            anyio.to_thread.run_sync(self.media.probe_write),
            ffmpeg_problem(self.ffmpeg, trust_healthy_s=CACHE_S),
        )
        worker = None if self._worker_alive() else "The job worker is not running."
        result = Readiness(
            {"database": database, "storage": storage, "ffmpeg": ffmpeg, "worker": worker}
        )
        self._last = (time.monotonic(), result)
        return result
