"""Audio with a known musical answer, for the analysis tests: drum patterns at a known
tempo and chord cadences in a known key."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float32]


def drum_pattern(bpm: float, seconds: float, sample_rate: int = 32_000, seed: int = 0) -> Samples:
    """A rock beat: kick on beats 1 and 3, snare on 2 and 4, closed hi-hat on every eighth."""
    frames = int(seconds * sample_rate)
    out = np.zeros(frames, dtype=np.float64)
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.2 * sample_rate)) / sample_rate
    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-t * 40)) * t) * np.exp(-t * 15)
    snare = 0.4 * rng.standard_normal(len(t)) * np.exp(-t * 30)
    snare += 0.3 * np.sin(2 * np.pi * 200 * t) * np.exp(-t * 30)
    hat = 0.1 * rng.standard_normal(len(t)) * np.exp(-t * 200)

    def hit(at_s: float, sound: npt.NDArray[np.float64]) -> None:
        start = round(at_s * sample_rate)
        n = min(len(sound), frames - start)
        if n > 0:
            out[start : start + n] += sound[:n]

    beat = 60 / bpm
    for i in range(int(seconds / beat) + 1):
        hit(i * beat, kick if i % 2 == 0 else snare)
        hit(i * beat, hat)
        hit(i * beat + beat / 2, hat)
    return (0.5 * out).astype(np.float32)


def cadence(tonic: int, minor: bool, seconds: float, sample_rate: int = 32_000) -> Samples:
    """I–IV–V–I (i–iv–V–i in minor) in the key whose tonic is ``tonic`` semitones above C,
    one chord a second, repeated: piano-like tones with a bass note under each chord."""
    third = 3 if minor else 4
    chords = [(0, third, 7), (5, 5 + third, 12), (7, 11, 14), (0, third, 7)]
    t = np.arange(sample_rate) / sample_rate
    envelope = np.minimum(1, t * 50) * np.exp(-t * 1.5)

    def tone(midi: int) -> npt.NDArray[np.float64]:
        f = 440 * 2 ** ((midi - 69) / 12)
        return np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)

    bars = [
        envelope * (sum(tone(48 + tonic + n) for n in chord) + tone(36 + tonic + chord[0]))
        for chord in chords
    ]
    frames = int(seconds * sample_rate)
    reps = -(-frames // (len(bars) * sample_rate))
    return (0.15 * np.concatenate(bars * reps)[:frames]).astype(np.float32)
