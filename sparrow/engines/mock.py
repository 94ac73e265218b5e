"""The mock engine: MusicGen's behaviour without a model or a GPU.

It keeps MusicGen's shape (32 kHz mono, one decoding step per 20 ms frame) and
batches as Sparrow's loop does: rows join between steps, every step serves all
rows in flight and sleeps ``step_ms`` once, and a row leaves when its steps are
done. So progress, cancellation, queueing and batching across requests behave as
they do on a GPU. Each row's audio is ``render_music`` from its seed:
deterministic, different for every seed, music-like, and of exactly the
requested duration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from sparrow.audio import render_music
from sparrow.engines.base import Audio, Continuation, EngineInfo, Progress, Row, frames_for
from sparrow.engines.batching import decode_alone

SAMPLE_RATE = 32_000
FRAME_RATE = 50  # decoding steps per second of audio, as MusicGen's


class MockEngine:
    def __init__(self, step_ms: float = 2.0) -> None:
        self.step_ms = step_ms

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def channels(self) -> int:
        return 1

    def info(self) -> EngineInfo:
        return EngineInfo(engine="mock", model="mock", device="cpu", loaded=True)

    def load(self) -> None:
        pass

    def batch(self) -> MockBatch:
        return MockBatch(self.step_ms)

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]:
        return decode_alone(self.batch(), request, progress)


@dataclass(eq=False)
class _Steps:
    row: Row
    frames: int
    steps: int
    done: int = 0


class MockBatch:
    """Rows that join between steps; each step sleeps once for all of them."""

    joins_midway = True

    def __init__(self, step_ms: float) -> None:
        self.step_ms = step_ms
        self.rows: list[_Steps] = []

    def __len__(self) -> int:
        return len(self.rows)

    def fits(self, row: Row) -> bool:
        return True

    def add(self, row: Row) -> None:
        frames = frames_for(row.sampling.duration_s, SAMPLE_RATE)
        self.rows.append(_Steps(row, frames, max(1, math.ceil(frames * FRAME_RATE / SAMPLE_RATE))))

    def remove(self, row: Row) -> None:
        self.rows = [r for r in self.rows if r.row is not row]

    def step(self, on_step: Callable[[], None]) -> list[tuple[Row, Audio]]:
        if self.step_ms:
            time.sleep(self.step_ms / 1000)
        for r in self.rows:
            r.done += 1
            r.row.fraction = r.done / r.steps
        on_step()
        finished = [r for r in self.rows if r.done >= r.steps]
        self.rows = [r for r in self.rows if r.done < r.steps]
        return [
            (r.row, render_music(r.frames / SAMPLE_RATE, SAMPLE_RATE, 1, r.row.seed)[: r.frames])
            for r in finished
        ]
