"""read_tail: the end of a path of segments, as the engine takes it, cut to the frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparrow.audio import read_wav, write_wav
from sparrow.audio.segments import Segment
from sparrow.audio.tail import read_tail

pytestmark = pytest.mark.anyio


def tone(seconds: float, rate: int, channels: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    mono = (0.25 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


async def test_the_tail_ends_at_each_segments_cut(tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    write_wav(a, tone(2.0, 32_000, 1, 220), 32_000)
    write_wav(b, tone(2.0, 32_000, 1, 330), 32_000)
    # a plays 1.5 s, then b plays 0.25 s: the last second is a's 0.75 s and b's 0.25 s.
    segments = [Segment(a, 48_000, 32_000, 1), Segment(b, 8_000, 32_000, 1)]
    tail = await read_tail(segments, 1.0, sample_rate=32_000, channels=1)
    expected = np.concatenate([read_wav(a)[24_000:48_000], read_wav(b)[:8_000]])
    np.testing.assert_array_equal(tail, expected)


async def test_mono_for_a_stereo_engine_goes_to_both_sides_at_full_level(tmp_path: Path) -> None:
    mono, stereo = tmp_path / "m.wav", tmp_path / "s.wav"
    write_wav(mono, tone(1.0, 32_000, 1), 32_000)
    write_wav(stereo, tone(1.0, 32_000, 2), 32_000)
    segments = [Segment(mono, 32_000, 32_000, 1), Segment(stereo, 32_000, 32_000, 2)]
    tail = await read_tail(segments, 2.0, sample_rate=32_000, channels=2)
    assert tail.shape == (64_000, 2)
    np.testing.assert_array_equal(tail[:32_000, 0], tail[:32_000, 1])
    np.testing.assert_array_equal(tail[:32_000, 0], read_wav(mono)[:, 0])  # no -3 dB
    np.testing.assert_array_equal(tail[32_000:], read_wav(stereo))
