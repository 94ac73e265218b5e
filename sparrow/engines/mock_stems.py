"""The mock stem engine: Demucs' behaviour without a model or a GPU.

It keeps Demucs' format (44.1 kHz stereo), so uploads go through the same decode
and resample path, and sleeps ``step_ms`` per 20 ms of audio (as the generation
mock does per decoding step), calling progress after each step, so progress,
cancellation and queueing behave as they do on a GPU.

The stems are frequency bands of the mix, cut in one FFT over the whole track:
``bass`` below 200 Hz, ``vocals`` the voice band 300–3400 Hz, ``drums`` the
cymbals and attacks above 3400 Hz, and ``other`` what remains (200–300 Hz). So
the four stems sum to the mix (up to float32 rounding), and the same mix always
gives the same stems.
"""

from __future__ import annotations

import math
import time

import numpy as np
import numpy.typing as npt

from sparrow.engines.base import STEM_NAMES, Audio, EngineInfo, Progress, check_mix

SAMPLE_RATE = 44_100
CHANNELS = 2
STEP_S = 0.02  # audio per progress step
BASS_HZ = 200.0
VOICE_HZ = (300.0, 3400.0)


class MockStemEngine:
    def __init__(self, step_ms: float = 2.0) -> None:
        self.step_ms = step_ms

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def channels(self) -> int:
        return CHANNELS

    def info(self) -> EngineInfo:
        return EngineInfo(engine="mock", model="mock", device="cpu", loaded=True)

    def load(self) -> None:
        pass

    def separate(self, audio: Audio, progress: Progress) -> dict[str, Audio]:
        check_mix(audio, CHANNELS)
        steps = max(1, math.ceil(len(audio) / (STEP_S * SAMPLE_RATE)))
        for step in range(1, steps + 1):
            if self.step_ms:
                time.sleep(self.step_ms / 1000)
            progress(step / steps)
        return split_bands(audio, SAMPLE_RATE)


def split_bands(audio: Audio, sample_rate: int) -> dict[str, Audio]:
    """The mix cut into ``STEM_NAMES`` by frequency band; the stems sum to the mix."""
    if len(audio) == 0:
        return {name: np.zeros_like(audio) for name in STEM_NAMES}
    mix = audio.astype(np.float64)
    spectrum = np.fft.rfft(mix, axis=0)
    hz = np.fft.rfftfreq(len(mix), 1 / sample_rate)

    def band(keep: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        return np.fft.irfft(spectrum * keep[:, None], n=len(mix), axis=0)

    bass = band(hz < BASS_HZ)
    vocals = band((hz >= VOICE_HZ[0]) & (hz < VOICE_HZ[1]))
    drums = band(hz >= VOICE_HZ[1])
    other = mix - bass - vocals - drums
    stems = {"drums": drums, "bass": bass, "other": other, "vocals": vocals}
    return {name: stems[name].astype(np.float32) for name in STEM_NAMES}
