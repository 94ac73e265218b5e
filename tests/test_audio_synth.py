"""render_music: deterministic, exact length, and music rather than a test tone."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sparrow.audio import render_music


def test_same_seed_same_audio_other_seed_other_audio() -> None:
    a = render_music(3.0, 32000, 2, seed=11)
    assert np.array_equal(a, render_music(3.0, 32000, 2, seed=11))
    assert not np.allclose(a, render_music(3.0, 32000, 2, seed=12), atol=0.05)


@pytest.mark.parametrize(("seconds", "rate"), [(1.0, 32000), (2.5, 44100), (0.33333, 48000),
                                               (0.00001, 32000), (0.0, 44100)])  # fmt: skip
@pytest.mark.parametrize("channels", [1, 2])
def test_exact_length_and_shape(seconds: float, rate: int, channels: int) -> None:
    audio = render_music(seconds, rate, channels, seed=1)
    assert audio.shape == (round(seconds * rate), channels)
    assert audio.dtype == np.float32


def test_level_is_about_minus_3_dbfs_and_not_silent() -> None:
    audio = render_music(4.0, 32000, 2, seed=5)
    assert float(np.abs(audio).max()) == pytest.approx(10 ** (-3 / 20), rel=1e-3)
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 0.05
    # Sound keeps going: no quarter-second of the piece is silent.
    blocks = audio[: len(audio) // 8000 * 8000].reshape(-1, 8000, 2)
    assert float(np.sqrt((blocks**2).mean(axis=(1, 2))).min()) > 0.01


def test_stereo_channels_differ() -> None:
    audio = render_music(2.0, 32000, 2, seed=3)
    assert not np.allclose(audio[:, 0], audio[:, 1], atol=0.01)


@pytest.mark.parametrize("seed", [0, 1, 2, 7, 2**40])
def test_spectrum_is_rich_not_a_sine(seed: int) -> None:
    mono = render_music(4.0, 32000, 1, seed=seed)[:, 0].astype(np.float64)
    power = np.abs(np.fft.rfft(mono * np.hanning(len(mono)))) ** 2
    # Many separate tonal peaks within 30 dB of the strongest one ...
    is_peak = (power[1:-1] > power[:-2]) & (power[1:-1] > power[2:])
    strong = is_peak & (power[1:-1] > power.max() / 1000)
    assert int(strong.sum()) >= 20
    # ... and energy spread over the band, unlike a sine (flatness ~0).
    band = power[20:8000] + 1e-20
    flatness = float(np.exp(np.mean(np.log(band))) / np.mean(band))
    assert flatness > 1e-4


def test_fast_enough_for_the_mock_engine() -> None:
    render_music(1.0, 32000, 2, seed=0)  # warm up numpy
    started = time.perf_counter()
    render_music(10.0, 32000, 2, seed=4)
    assert time.perf_counter() - started < 0.5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seconds"):
        render_music(-1.0, 32000, 2, seed=0)
