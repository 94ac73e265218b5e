"""Tempo and key of a canonical WAV, with librosa (SPEC §12).

- **Tempo**: librosa's beat tracker over its onset-strength envelope, at 22.05 kHz
  with librosa's hop of 512 samples. The tracker's own tempo comes from tempogram
  bins that are coarse at that hop (a clean 120 BPM pattern reads 117.5), and the
  beats it places follow that tempo, so the beat times cannot refine it. The
  tracker picks the metrical level (120, not 60 or 240); the tempo reported is
  the peak of the onset envelope's spectrum within ±``REFINE_SPAN`` of it, the
  frequency at which the onsets recur. Fewer than ``MIN_BEATS`` beats, or no
  onset strength at all, tell no tempo.
- **Key**: the time-summed chroma (``chroma_cqt``) correlated with the 24
  Krumhansl–Kessler key profiles (major and minor, each rotated to the 12
  tonics); the best is the key. A chroma in which no pitch class stands out
  (``MIN_CHROMA_CONTRAST``: noise) or that correlates with none of the profiles
  by at least ``MIN_KEY_CORRELATION`` (a drum loop) tells no key.

librosa is imported on first use, so the API's start and its requests never pay
for it (it brings numba and scipy); ``warm`` compiles numba's kernels once where
the analysis runs, so the first node does not wait for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sparrow.audio.wav import read_layout, read_wav

ANALYSIS_RATE = 22_050
MIN_SECONDS = 1.0  # shorter audio tells neither
MIN_BEATS = 4
KEY_MIN_SAMPLES = 64 * 1024 + 1
REFINE_SPAN = 0.06  # the tracker's tempo is refined within ±6 % of itself
REFINE_STEPS = 601
MIN_KEY_CORRELATION = 0.6
# The chroma's spread (std / mean of the 12 classes): noise measures about 0.03, music
# 0.27 to 0.45 and a plain cadence about 1 here.
MIN_CHROMA_CONTRAST = 0.1
SILENT_RMS = 1e-4  # about -80 dBFS
KEY_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Krumhansl & Kessler (1982): how well each degree of the scale fits the key.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@dataclass(frozen=True)
class Musical:
    tempo_bpm: float | None
    key: str | None


def analyse_file(path: Path) -> Musical:
    """The tempo and key of the WAV at ``path`` (blocking: run it in a thread)."""
    return analyse(read_wav(path).mean(axis=1), read_layout(path).sample_rate)


def analyse(mono: npt.NDArray[np.float32], sample_rate: int) -> Musical:
    """The tempo and key of mono samples (blocking)."""
    import librosa

    if len(mono) < MIN_SECONDS * sample_rate or _rms(mono) < SILENT_RMS:
        return Musical(None, None)
    y = librosa.resample(
        np.ascontiguousarray(mono, dtype=np.float32), orig_sr=sample_rate, target_sr=ANALYSIS_RATE
    )
    with np.errstate(all="ignore"):  # a flat chroma or envelope tells nothing; no warning
        return Musical(_tempo(librosa, y), _key(librosa, y))


def _rms(mono: npt.NDArray[np.float32]) -> float:
    return float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))


def warm() -> None:
    """Compile librosa's numba kernels (seconds, once per process; later calls take
    milliseconds)."""
    seconds = 4
    t = np.arange(seconds * ANALYSIS_RATE) / ANALYSIS_RATE
    clicks = (np.sin(2 * np.pi * 440 * t) * (np.mod(t, 0.5) < 0.05)).astype(np.float32)
    analyse(clicks, ANALYSIS_RATE)


def _tempo(librosa: Any, y: npt.NDArray[np.float32]) -> float | None:
    envelope = librosa.onset.onset_strength(y=y, sr=ANALYSIS_RATE)
    if not np.any(envelope > 0):
        return None
    coarse, beats = librosa.beat.beat_track(onset_envelope=envelope, sr=ANALYSIS_RATE)
    coarse = float(np.atleast_1d(coarse)[0])
    if len(beats) < MIN_BEATS or not coarse > 0:
        return None
    # The envelope's spectrum near the tracker's tempo: its peak is the beat's frequency.
    times = librosa.times_like(envelope, sr=ANALYSIS_RATE)
    hz = np.linspace(1 - REFINE_SPAN, 1 + REFINE_SPAN, REFINE_STEPS) * coarse / 60
    # Centred and windowed, so that neither the mean nor the clip's ends leak into the peak.
    centred = (envelope - envelope.mean()) * np.hanning(len(envelope))
    power = np.abs(np.exp(-2j * np.pi * np.outer(hz, times)) @ centred)
    return float(hz[int(np.argmax(power))] * 60)


def _key(librosa: Any, y: npt.NDArray[np.float32]) -> str | None:
    # The lowest octaves are read at a 64th of the rate, with 1024-sample frames: a clip
    # shorter than that is looped (the summed chroma is the same) rather than warned about.
    if len(y) < KEY_MIN_SAMPLES:
        y = np.tile(y, -(-KEY_MIN_SAMPLES // len(y)))
    # Tuned to A440: estimating the tuning costs time, and warns on sparse spectra.
    chroma = librosa.feature.chroma_cqt(y=y, sr=ANALYSIS_RATE, tuning=0.0)
    profile = chroma.sum(axis=1)
    mean = float(profile.mean())
    if not mean > 0 or float(profile.std()) / mean < MIN_CHROMA_CONTRAST:
        return None  # no pitch class stands out: noise, or no pitch at all
    best, name = -1.0, None
    for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            r = float(np.corrcoef(profile, np.roll(template, tonic))[0, 1])
            if r > best:
                best, name = r, f"{KEY_NAMES[tonic]} {mode}"
    return name if best >= MIN_KEY_CORRELATION else None
