"""A played segment: the first frames of one canonical WAV, as a path plays them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Segment:
    """The first ``frames`` frames of the WAV at ``path`` (whose rate is ``sample_rate``, in
    ``channels`` channels)."""

    path: Path
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate
