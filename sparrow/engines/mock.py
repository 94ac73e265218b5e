"""The mock engine: MusicGen's behaviour without a model or a GPU.

It keeps MusicGen's shape (32 kHz mono, one decoding step per 20 ms frame for
the whole batch) and sleeps ``step_ms`` per step, so progress, cancellation
and queueing behave as they do on a GPU. Each sibling's audio is
``render_music`` from its seed: deterministic, different for every seed,
music-like, and of exactly the requested duration.
"""

from __future__ import annotations

import math
import time

from sparrow.audio import render_music
from sparrow.engines.base import Audio, Continuation, EngineInfo, Progress, frames_for

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

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]:
        frames = frames_for(request.duration_s, SAMPLE_RATE)
        steps = max(1, math.ceil(frames * FRAME_RATE / SAMPLE_RATE))
        for step in range(1, steps + 1):
            if self.step_ms:
                time.sleep(self.step_ms / 1000)
            progress(step / steps)
        return [
            render_music(frames / SAMPLE_RATE, SAMPLE_RATE, 1, seed)[:frames]
            for seed in request.seeds
        ]
