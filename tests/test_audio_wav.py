"""write_wav / read_wav / read_wav_info: exact round trips and atomic publishing."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sparrow.audio import WavFormatError, ffmpeg_exe, read_wav, read_wav_info, write_wav
from sparrow.audio import wav as wav_module


def _signal(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (frames, channels)).astype(np.float32)


@pytest.mark.parametrize(("bits", "channels", "frames"), [
    (16, 1, 1), (16, 2, 44100), (24, 1, 12345), (24, 2, 48000), (16, 6, 999), (24, 3, 7),
])  # fmt: skip
def test_round_trip_is_exact_to_the_quantisation_step(
    tmp_path: Path, bits: int, channels: int, frames: int
) -> None:
    samples = _signal(frames, channels)
    path = tmp_path / "a.wav"

    info = write_wav(path, samples, 48000, bits=bits)

    back = read_wav(path)
    assert back.dtype == np.float32
    assert back.shape == (frames, channels)
    step = 1 / (1 << (bits - 1))
    # Rounding costs half a step; clipping at +1 (full scale is 1 - step) a whole one.
    assert float(np.max(np.abs(back - samples))) <= step
    assert (info.frames, info.channels, info.bits, info.sample_rate) == (
        frames,
        channels,
        bits,
        48000,
    )
    assert info.duration_s == frames / 48000
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_wav_info(path) == info
    assert list(tmp_path.iterdir()) == [path]


def test_quantised_values_come_back_exactly(tmp_path: Path) -> None:
    ints = np.array([[-32768, 32767], [0, 1], [-1, 12345]], dtype=np.int16)
    path = tmp_path / "a.wav"
    write_wav(path, ints / 32768.0, 8000)
    assert np.array_equal(np.rint(read_wav(path) * 32768).astype(np.int16), ints)

    ints24 = np.array([[-8388608], [8388607], [-1], [65536 * 3 + 5]])
    write_wav(path, ints24 / 8388608.0, 8000, bits=24)
    assert np.array_equal(np.rint(read_wav(path).astype(np.float64) * 8388608), ints24)


def test_out_of_range_and_nan_are_clipped(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, np.array([[2.0], [-3.0], [np.nan], [np.inf]], dtype=np.float32), 8000)
    assert read_wav(path)[:, 0].tolist() == [32767 / 32768, -1.0, 0.0, 32767 / 32768]


def test_one_dimensional_input_is_mono(tmp_path: Path) -> None:
    info = write_wav(tmp_path / "a.wav", np.zeros(10), 8000)
    assert (info.channels, info.frames) == (1, 10)


def test_empty_audio_is_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    info = write_wav(path, np.zeros((0, 2), dtype=np.float32), 44100)
    assert info.frames == 0
    assert read_wav(path).shape == (0, 2)


def test_odd_sized_data_chunk_is_padded(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    info = write_wav(path, _signal(3, 1), 8000, bits=24)  # 9 data bytes
    assert path.stat().st_size % 2 == 0
    assert read_wav_info(path) == info


@pytest.mark.parametrize(
    ("bits", "channels", "codec"), [(16, 2, "pcm_s16le"), (24, 1, "pcm_s24le")]
)
def test_ffmpeg_reads_what_we_write(tmp_path: Path, bits: int, channels: int, codec: str) -> None:
    samples = _signal(4800, channels)
    path = tmp_path / "a.wav"
    write_wav(path, samples, 48000, bits=bits)
    decoded = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
         "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    probe = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True, text=True
    ).stderr
    assert codec in probe
    from_ffmpeg = np.frombuffer(decoded, dtype="<f4").reshape(-1, channels)
    np.testing.assert_allclose(from_ffmpeg, read_wav(path), atol=1e-7)


def test_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, _signal(100, 2, seed=1), 8000)
    second = write_wav(path, _signal(200, 2, seed=2), 8000)
    assert read_wav_info(path) == second
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(block: np.ndarray, bits: int) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(wav_module, "_quantise", explode)
    with pytest.raises(OSError, match="disk full"):
        write_wav(tmp_path / "a.wav", _signal(10, 1), 8000)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.wav"
    first = write_wav(path, _signal(10, 1), 8000)
    monkeypatch.setattr(wav_module, "_quantise", lambda block, bits: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_wav(path, _signal(20, 1), 8000)
    assert read_wav_info(path) == first
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("samples", "bits", "rate"),
    [(np.zeros((2, 2, 2)), 16, 8000), (np.zeros((4, 1)), 8, 8000), (np.zeros((4, 1)), 16, 0)],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, samples: np.ndarray, bits: int, rate: int
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        write_wav(tmp_path / "a.wav", samples, rate, bits=bits)
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, _signal(100, 2), 8000)
    data = path.read_bytes()

    path.write_bytes(data[:-10])
    with pytest.raises(WavFormatError, match="claims"):
        read_wav_info(path)
    path.write_bytes(b"RIFX" + data[4:])
    with pytest.raises(WavFormatError, match="RIFF/WAVE"):
        read_wav_info(path)
    path.write_bytes(data[:12])
    with pytest.raises(WavFormatError, match="no data chunk"):
        read_wav_info(path)
    float_wav = bytearray(data)
    float_wav[20:22] = (3).to_bytes(2, "little")
    path.write_bytes(bytes(float_wav))
    with pytest.raises(WavFormatError, match="not PCM"):
        read_wav_info(path)


@pytest.mark.parametrize("bits", [16, 24])
def test_a_transposed_view_writes_as_its_samples(tmp_path: Path, bits: int) -> None:
    """Stereo audio often arrives as a transposed view (MusicGen's (channels, samples).T)."""
    rng = np.random.default_rng(0)
    planar = (0.5 * rng.standard_normal((2, 1000))).astype(np.float32)
    view, copy = planar.T, np.ascontiguousarray(planar.T)
    assert not view.flags.c_contiguous
    a = write_wav(tmp_path / "a.wav", view, 32_000, bits)
    b = write_wav(tmp_path / "b.wav", copy, 32_000, bits)
    assert a.sha256 == b.sha256
