"""A bound on uploads being received or decoded at once: each holds a file in ``tmp/``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sparrow.errors import Overloaded


class UploadSlots:
    """Refuses an upload (429 with ``Retry-After``) while ``limit`` are already under way."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.in_use >= self.limit:
            raise Overloaded(
                f"{self.limit} uploads are already being received or decoded; try again shortly.",
                retry_after_s=2,
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
