"""Room in the job queue: the limits a new job must fit in (SPEC §5, §7)."""

from __future__ import annotations

import math
from collections.abc import Callable

from sparrow.errors import Overloaded
from sparrow.models import Caller
from sparrow.settings import Settings
from sparrow.store import ChainWriter


class QueueLimits:
    """Refuses a job (429 with Retry-After) when the queue, or the caller's share of it, is full."""

    def __init__(self, settings: Settings, retry_after_s: Callable[[], float]) -> None:
        self.settings = settings
        self._retry_after_s = retry_after_s

    async def check(self, w: ChainWriter, caller: Caller) -> None:
        """Called inside the transaction that inserts the job, so the count cannot go stale."""
        waiting = await w.waiting_jobs()
        if waiting >= self.settings.queue_limit:
            raise self._full(f"The job queue is full ({waiting} jobs waiting); try again later.")
        if caller.owner is not None:
            mine = await w.waiting_jobs(caller.owner)
            if mine >= self.settings.queue_limit_per_owner:
                raise self._full(
                    f"This key already has {mine} jobs waiting (the limit per key); "
                    "try again once some have run."
                )

    def _full(self, detail: str) -> Overloaded:
        return Overloaded(detail, retry_after_s=max(1, math.ceil(self._retry_after_s())))
