"""compute_peaks against hand-computed audiowaveform output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparrow.audio import compute_peaks, write_wav
from sparrow.audio import peaks as peaks_module
from sparrow.errors import InvalidInput

LEFT = [1000, -3000, 256, -255, 32767]
RIGHT = [-1000, 500, -512, 20000, -32768]


@pytest.fixture
def known(tmp_path: Path) -> Path:
    path = tmp_path / "known.wav"
    write_wav(path, np.array([LEFT, RIGHT]).T / 32768, 44100)
    return path


def test_split_channels_by_hand(known: Path) -> None:
    peaks = compute_peaks(known, samples_per_pixel=2, split_channels=True)
    # Pixel by pixel, channel by channel: 16-bit / 256 truncated toward zero.
    #   p0: L -3000..1000 → -11, 3    R -1000..500 → -3, 1
    #   p1: L -255..256   → 0, 1      R -512..20000 → -2, 78
    #   p2 (one frame): L 32767 → 127, 127   R -32768 → -128, -128
    assert peaks == {
        "version": 2,
        "channels": 2,
        "sample_rate": 44100,
        "samples_per_pixel": 2,
        "bits": 8,
        "length": 3,
        "data": [-11, 3, -3, 1, 0, 1, -2, 78, 127, 127, -128, -128],
    }


def test_merged_channels_by_hand(known: Path) -> None:
    peaks = compute_peaks(known, samples_per_pixel=2)
    # Per frame (L + R) / 2, truncated: 0, -1250, -128, 9872, 0.
    #   p0: -1250..0 → -4, 0   p1: -128..9872 → 0, 38   p2: 0..0
    assert peaks["channels"] == 1
    assert peaks["length"] == 3
    assert peaks["data"] == [-4, 0, 0, 38, 0, 0]


def test_24_bit_input_drops_the_low_byte_first(tmp_path: Path) -> None:
    values = [-1, 8388607, -8388608, 65536 * 3 + 5, -(65536 * 3) - 5, 255]
    path = tmp_path / "hi.wav"
    write_wav(path, np.array(values)[:, None] / 8388608, 96000, bits=24)
    peaks = compute_peaks(path, samples_per_pixel=2)
    # >> 8 gives -1, 32767, -32768, 768, -769, 0; then / 256 truncated.
    assert peaks["data"] == [0, 127, -128, 3, -3, 0]


def test_file_shorter_than_a_pixel_and_empty_file(tmp_path: Path) -> None:
    short = tmp_path / "short.wav"
    write_wav(short, np.full((3, 1), 0.5), 8000)
    assert compute_peaks(short, samples_per_pixel=512)["data"] == [64, 64]
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros((0, 2)), 8000)
    peaks = compute_peaks(empty, samples_per_pixel=512, split_channels=True)
    assert (peaks["length"], peaks["data"]) == (0, [])


def _reference(ints: np.ndarray, spp: int, split: bool) -> list[int]:
    """A plain loop, written the way audiowaveform's C++ reads."""
    rows = ints.tolist()
    out: list[int] = []
    for start in range(0, len(rows), spp):
        chunk = rows[start : start + spp]
        columns: list[list[int]]
        if split:
            columns = [list(column) for column in zip(*chunk, strict=True)]
        else:
            # int() of the quotient truncates toward zero, like C's "/".
            columns = [[int(sum(frame) / len(frame)) for frame in chunk]]
        for column in columns:
            out += [int(min(column) / 256), int(max(column) / 256)]
    return out


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bits", [16, 24])
def test_chunk_boundaries_do_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: bool, bits: int
) -> None:
    full_scale = 1 << (bits - 1)
    ints = np.random.default_rng(bits).integers(-full_scale, full_scale, (10_007, 3))
    path = tmp_path / "noise.wav"
    write_wav(path, ints / full_scale, 22050, bits=bits)
    monkeypatch.setattr(peaks_module, "_CHUNK_FRAMES", 1000)  # many chunks, a ragged end

    peaks = compute_peaks(path, samples_per_pixel=300, split_channels=split)

    assert peaks["length"] == 34
    assert peaks["channels"] == (3 if split else 1)
    as_16_bit = ints >> (bits - 16)
    assert peaks["data"] == _reference(as_16_bit, 300, split)


def test_samples_per_pixel_below_two_is_invalid(known: Path) -> None:
    with pytest.raises(InvalidInput):
        compute_peaks(known, samples_per_pixel=1)
