"""read_tail: the end of a path of segments, as the engine takes it, cut to the frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparrow.audio import read_wav, tail, write_wav
from sparrow.audio.segments import Segment
from sparrow.audio.tail import read_tail
from sparrow.errors import StorageUnavailable

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


def _path_of_many_kinds(tmp_path: Path) -> list[Segment]:
    """A 24-bit stereo upload, a mono continuation played up to a cut, and a stereo
    one: everything a path at the engine's rate holds."""
    rng = np.random.default_rng(3)
    upload, mono, last = tmp_path / "u.wav", tmp_path / "m.wav", tmp_path / "l.wav"
    write_wav(upload, rng.uniform(-0.9, 0.9, (40_000, 2)).astype(np.float32), 32_000, 24)
    write_wav(mono, rng.uniform(-0.9, 0.9, (32_000, 1)).astype(np.float32), 32_000)
    write_wav(last, rng.uniform(-0.9, 0.9, (20_000, 2)).astype(np.float32), 32_000)
    return [
        Segment(upload, 40_000, 32_000, 2),
        Segment(mono, 25_000, 32_000, 1),
        Segment(last, 20_000, 32_000, 2),
    ]


async def test_a_tail_needing_no_conversion_is_read_without_ffmpeg_as_ffmpeg_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segments = _path_of_many_kinds(tmp_path)
    direct = {
        seconds: await read_tail(segments, seconds, sample_rate=32_000, channels=2)
        for seconds in (0.5, 1.5, 2.0, 10.0)
    }
    monkeypatch.setattr(tail, "_direct", lambda *_: False)  # every read through FFmpeg
    for seconds, samples in direct.items():
        through_ffmpeg = await read_tail(segments, seconds, sample_rate=32_000, channels=2)
        assert samples.dtype == np.float32 and samples.flags.c_contiguous
        np.testing.assert_array_equal(samples, through_ffmpeg, err_msg=f"{seconds} s")
    assert len(direct[10.0]) == 40_000 + 25_000 + 20_000


async def test_a_tail_needing_no_conversion_starts_no_ffmpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_ffmpeg(*_: object, **__: object) -> None:
        raise AssertionError("FFmpeg was started")

    monkeypatch.setattr(tail, "run_ffmpeg", no_ffmpeg)
    segments = _path_of_many_kinds(tmp_path)
    assert len(await read_tail(segments, 1.0, sample_rate=32_000, channels=2)) == 32_000
    # A stereo segment for a mono engine needs FFmpeg's downmix.
    with pytest.raises(AssertionError, match="FFmpeg was started"):
        await read_tail(segments, 1.0, sample_rate=32_000, channels=1)


async def test_a_file_that_is_not_what_its_segment_says_is_left_to_ffmpeg(
    tmp_path: Path,
) -> None:
    segments = _path_of_many_kinds(tmp_path)
    last = segments[-1].path
    last.write_bytes(last.read_bytes()[:-4_000])  # 1,000 frames cut off the end
    with pytest.raises(StorageUnavailable, match="frames instead of"):
        await read_tail(segments, 1.0, sample_rate=32_000, channels=2)
