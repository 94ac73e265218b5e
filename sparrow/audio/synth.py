"""Deterministic, music-like test audio.

``render_music`` makes a short loop-based arrangement from a seed: a tempo
(84–132 BPM), a key and mode, and a four-chord progression are drawn from the
seed; a plucked arpeggio (Karplus–Strong strings) and strummed chords play the
progression over a bass line and a kick/hi-hat pattern. The same arguments
always give the same samples; another seed gives another piece.

It is the sample clip's source (``data/sample.flac``) and the mock engine's
voice, so it must be cheap: the plucked strings are synthesised once per pitch,
a period at a time with numpy, and every note is a slice-add of a template.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

PEAK_DBFS = -3.0

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
# Scale degrees (0 = tonic) of four-bar progressions that sound like songs.
_MAJOR_PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 3), (5, 3, 0, 4))
_MINOR_PROGRESSIONS = ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4))
# Which chord tone each eighth note of a bar plays (3 = the root an octave up).
_ARPEGGIOS = ((0, 1, 2, 3, 2, 1, 0, 1), (0, 2, 1, 3, 0, 2, 1, 2), (3, 2, 1, 0, 1, 2, 3, 2))

_PLUCK_S = 1.2
_BASS_S = 0.9
_Mono = npt.NDArray[np.float64]


def render_music(
    seconds: float, sample_rate: int, channels: int, seed: int
) -> npt.NDArray[np.float32]:
    """``round(seconds * sample_rate)`` frames of music, float32 (frames, channels).

    Peak level is -3 dBFS. Two channels get a stereo mix (instruments panned
    apart); one channel gets its mono sum; more channels repeat the stereo pair.
    """
    if seconds < 0 or sample_rate < 1 or channels < 1:
        raise ValueError("seconds must be >= 0, sample_rate and channels >= 1")
    frames = round(seconds * sample_rate)
    out = np.zeros((frames, channels), dtype=np.float32)
    if frames == 0:
        return out
    mix = _Arrangement(frames, sample_rate, seed).render()
    if channels == 1:
        out[:, 0] = mix.mean(axis=1)
    else:
        out[:] = np.tile(mix, (1, math.ceil(channels / 2)))[:, :channels]
    peak = float(np.abs(out).max())
    if peak > 0:
        out *= np.float32(10 ** (PEAK_DBFS / 20) / peak)
    return out


class _Arrangement:
    def __init__(self, frames: int, sample_rate: int, seed: int) -> None:
        self.frames = frames
        self.sr = sample_rate
        self.rng = np.random.default_rng(seed & 0xFFFF_FFFF_FFFF_FFFF)
        self.mix = np.zeros((frames, 2), dtype=np.float64)
        self.bpm = int(self.rng.integers(84, 133))
        self.tonic = 40 + int(self.rng.integers(0, 12))  # MIDI note of the bass tonic
        minor = bool(self.rng.random() < 0.5)
        self.scale = _MINOR if minor else _MAJOR
        progressions = _MINOR_PROGRESSIONS if minor else _MAJOR_PROGRESSIONS
        self.progression = progressions[int(self.rng.integers(0, len(progressions)))]
        self.arpeggio = _ARPEGGIOS[int(self.rng.integers(0, len(_ARPEGGIOS)))]
        self._plucks: dict[int, _Mono] = {}
        self._basses: dict[int, _Mono] = {}

    def render(self) -> _Mono:
        beat = 60.0 / self.bpm
        bars = math.ceil(self.frames / self.sr / (4 * beat))
        kick, hat = self._kick(), self._hat()
        for bar in range(bars):
            t0 = bar * 4 * beat
            chord = self._chord(self.progression[bar % len(self.progression)])
            for i, note in enumerate(chord[:3]):  # strum: a few ms between strings
                self._add(self._pluck(note), t0 + 0.012 * i, 0.35, pan=-0.5 + 0.5 * i)
            for step, tone in enumerate(self.arpeggio):
                pan = -0.6 if step % 2 else 0.6
                velocity = 0.3 + 0.1 * float(self.rng.random())
                self._add(self._pluck(chord[tone] + 12), t0 + step * beat / 2, velocity, pan)
            for step in (0, 3, 4, 6):  # a simple syncopated root/fifth bass
                note = chord[0] - 12 + (7 if step == 6 else 0)
                self._add(self._bass(note), t0 + step * beat / 2, 0.6, pan=0.0)
            for step in range(8):
                if step in (0, 4) or (step == 5 and self.rng.random() < 0.5):
                    self._add(kick, t0 + step * beat / 2, 0.9, pan=0.0)
                self._add(hat, t0 + step * beat / 2, 0.12 if step % 2 else 0.07, pan=0.3)
        return self.mix

    def _chord(self, degree: int) -> tuple[int, int, int, int]:
        """MIDI notes of the triad on ``degree`` (root position) plus the octave."""
        notes = []
        for k in (0, 2, 4):
            d = degree + k
            notes.append(self.tonic + 12 + self.scale[d % 7] + 12 * (d // 7))
        return notes[0], notes[1], notes[2], notes[0] + 12

    def _add(self, sound: _Mono, start_s: float, gain: float, pan: float) -> None:
        # A little timing jitter keeps the grid from sounding mechanical.
        start = round((start_s + 0.004 * float(self.rng.standard_normal())) * self.sr)
        start = max(0, start)
        if start >= self.frames:
            return
        part = sound[: self.frames - start] * gain
        angle = (pan + 1) * math.pi / 4  # constant-power pan
        self.mix[start : start + len(part), 0] += part * math.cos(angle)
        self.mix[start : start + len(part), 1] += part * math.sin(angle)

    def _pluck(self, note: int) -> _Mono:
        """A Karplus–Strong string: noise in a delay line, averaged each period."""
        if note not in self._plucks:
            period = max(2, round(self.sr / _hz(note)))
            length = int(_PLUCK_S * self.sr)
            y = np.zeros(length + period + 1)
            y[1 : period + 1] = self.rng.uniform(-1, 1, period)
            # Each period depends only on the previous one: compute a period at a time.
            for start in range(period + 1, len(y), period):
                end = min(start + period, len(y))
                y[start:end] = 0.498 * (
                    y[start - period : end - period] + y[start - period - 1 : end - period - 1]
                )
            tone = y[1 : length + 1]
            tone *= np.minimum(1.0, np.linspace(12.0, 0.0, length))  # fade out the tail
            self._plucks[note] = tone
        return self._plucks[note]

    def _bass(self, note: int) -> _Mono:
        """A round decaying tone: fundamental plus two soft harmonics."""
        if note not in self._basses:
            t = np.arange(int(_BASS_S * self.sr)) / self.sr
            f = _hz(note)
            wave = sum(
                a * np.sin(2 * np.pi * f * k * t) for k, a in ((1, 1.0), (2, 0.35), (3, 0.15))
            )
            envelope = np.exp(-t * 4.0) * np.minimum(1.0, t * 200)
            self._basses[note] = np.asarray(wave) * envelope
        return self._basses[note]

    def _kick(self) -> _Mono:
        t = np.arange(int(0.25 * self.sr)) / self.sr
        # A sine sweeping down from 150 Hz to ~45 Hz: the phase is the integral of the pitch.
        freq = 45 + 105 * np.exp(-t * 30)
        phase = 2 * np.pi * np.cumsum(freq) / self.sr
        result: _Mono = np.sin(phase) * np.exp(-t * 12)
        return result

    def _hat(self) -> _Mono:
        n = int(0.05 * self.sr)
        noise = self.rng.uniform(-1, 1, n + 1)
        bright = np.diff(noise)  # first difference: a crude high-pass
        result: _Mono = bright * np.exp(-np.arange(n) / self.sr * 80)
        return result


def _hz(note: int) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)
