"""Loudness as EBU R128 measures it, with FFmpeg's ``ebur128`` filter; the filter that
brings audio to a target loudness under a true-peak ceiling; and ``match``, which
brings samples in memory to a loudness (a continuation to its context's).

``measure`` reads integrated loudness (LUFS) and true peak (dBTP, ``peak=true``:
4× oversampled) from the filter's summary. ``normalizer`` is a measured gain
followed by a limiter that runs at four times the rate, so that it limits the
peaks between samples too, then back to the rate and pinned to the exact frame
count. FFmpeg's one-pass ``loudnorm`` undershoots on short material (about 2 LU
at −14 LUFS here); a measured gain hits the target, and a second, corrected
pass makes up for what the limiter took (see ``sparrow.audio.join``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyloudnorm

from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import FFmpegTimeout, run_ffmpeg
from sparrow.audio.storage import scrub_paths, storing
from sparrow.audio.wav import write_wav
from sparrow.errors import EngineUnavailable, StorageUnavailable
from sparrow.models import new_id

Audio = npt.NDArray[np.float32]  # (frames, channels)

log = logging.getLogger(__name__)

MIN_LUFS = -40.0
MAX_LUFS = -5.0
TRUE_PEAK_CEILING_DBTP = -1.0
# The limiter aims below the ceiling at first: its 4× oversampling is close to, not
# exactly, ebur128's, and an MP3's true peak rises when it is decoded (by up to 0.7 dB
# for loud material here). A pass that still overshoots lowers it by the overshoot.
LIMITER_DBTP = -1.5
SILENT_LUFS = -70.0  # ebur128's absolute gate: nothing louder was heard
TIMEOUT_S = 120.0
TOLERANCE_LU = 0.5  # the contracts allow 1 LU: half of it for what decoding changes
PASSES = 6
STALLED_LU = 0.1  # a pass that gets no closer than this to the target ends the passes

_INTEGRATED = re.compile(r"Integrated loudness:\s*\n\s*I:\s*(-?[\d.]+|-inf)\s*LUFS")
_TRUE_PEAK = re.compile(r"True peak:\s*\n\s*Peak:\s*(-?[\d.]+|-inf)\s*dBFS")


@dataclass(frozen=True)
class Loudness:
    integrated_lufs: float  # SILENT_LUFS or below for silence
    true_peak_dbtp: float  # -inf for digital silence

    @property
    def silent(self) -> bool:
        return self.integrated_lufs <= SILENT_LUFS


async def measure(
    path: Path,
    *,
    ffmpeg: str | None = None,
    timeout_s: float = TIMEOUT_S,
    background: bool = False,
) -> Loudness:
    """The file's integrated loudness and true peak; ``background``: measured at the
    lowest CPU priority."""
    require_ffmpeg_not_known_broken(ffmpeg, "The loudness cannot be measured")
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        result = await run_ffmpeg(
            _measure_args(path), deadline=deadline, ffmpeg=ffmpeg, background=background
        )
    except FFmpegTimeout:
        raise EngineUnavailable(
            f"FFmpeg did not measure the loudness within {timeout_s:g} s."
        ) from None
    summary = _summary(result.stderr)
    if result.returncode != 0 or summary is None:
        await blame_ffmpeg(ffmpeg, "The loudness cannot be measured")
        tail = scrub_paths(result.stderr.strip()[-200:]) or "no summary"
        raise StorageUnavailable(f"The loudness could not be measured: {tail}.")
    return summary


def _summary(stderr: str) -> Loudness | None:
    """The loudness in ebur128's summary on FFmpeg's stderr; None if it printed none."""
    integrated = _INTEGRATED.search(stderr)
    peak = _TRUE_PEAK.search(stderr)
    if integrated is None or peak is None:
        return None
    return Loudness(_number(integrated.group(1)), _number(peak.group(1)))


def _measure_args(path: Path) -> list[str]:
    return [
        "-nostdin", "-hide_banner", "-nostats",
        "-i", str(path.absolute()),
        "-af", "ebur128=peak=true:framelog=quiet",
        "-f", "null", "-",
    ]  # fmt: skip


def _number(text: str) -> float:
    return -math.inf if text == "-inf" else float(text)


def gain_to(target_lufs: float, measured: Loudness) -> float:
    """The gain in dB that brings ``measured`` to ``target_lufs`` (0 for silence)."""
    return 0.0 if measured.silent else target_lufs - measured.integrated_lufs


def normalizer(
    gain_db: float, *, ceiling_dbtp: float = LIMITER_DBTP, sample_rate: int, frames: int
) -> str:
    """FFmpeg filters: the gain, a limiter at ``ceiling_dbtp`` run at 4× the rate (so it
    limits the peaks between samples too), and exactly ``frames`` frames."""
    limit = max(0.0625, 10 ** (ceiling_dbtp / 20))  # alimiter's floor: -24 dB
    return ",".join(
        [
            f"volume={gain_db:.3f}dB",
            f"aresample={sample_rate * 4}",
            f"alimiter=limit={limit:.6f}:level=false:latency=true:attack=1:release=20",
            f"aresample={sample_rate}",
            f"apad=whole_len={frames}",
            f"atrim=end_sample={frames}",
        ]
    )


async def match(
    samples: Audio,
    sample_rate: int,
    target_lufs: float,
    *,
    folder: Path,
    ffmpeg: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> tuple[Audio, Loudness]:
    """``samples`` brought to ``target_lufs`` under the true-peak ceiling, and their
    loudness as then measured. Silent audio comes back as it is. The first gain comes
    from ``estimate`` (no FFmpeg run); every pass is measured by ebur128.

    Each pass is one FFmpeg run over a 24-bit copy of the samples: the normalizer, then
    ``ebur128`` measuring what it made, the samples out through a pipe. A pass more than
    ``TOLERANCE_LU`` off, or over the ceiling, is followed by one with the gain and the
    limiter corrected by what it missed (``PASSES`` at most)."""
    frames, channels = samples.shape
    measured = await asyncio.to_thread(estimate, samples, sample_rate)
    if measured.silent:
        return samples, Loudness(SILENT_LUFS, -math.inf)
    source = folder / f".loudness-{new_id()}.wav"
    await _write_copy(source, samples, sample_rate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        matched = samples
        # The pipe holds the frames (pinned by the filters) and a second of slack.
        limit = (frames + sample_rate) * channels * 4

        async def one_pass(gain_db: float, ceiling_dbtp: float) -> Loudness:
            nonlocal matched
            filters = normalizer(
                gain_db, ceiling_dbtp=ceiling_dbtp, sample_rate=sample_rate, frames=frames
            )
            matched, got = await _filtered(source, filters, channels, limit, deadline, ffmpeg)
            return got

        with np.errstate(divide="ignore"):  # not reached: silence returned above
            peak = 20 * math.log10(float(np.max(np.abs(samples))))
        got = await converge(target_lufs, measured, one_pass, "the continuation", peak_db=peak)
        return matched, got
    finally:
        await asyncio.to_thread(_remove, source)


async def converge(
    target_lufs: float,
    measured: Loudness,
    one_pass: Callable[[float, float], Awaitable[Loudness]],
    what: str,
    *,
    peak_db: float | None = None,
) -> Loudness:
    """Run ``one_pass(gain_db, ceiling_dbtp)`` (it makes the audio and measures it) until
    the result is within ``TOLERANCE_LU`` of ``target_lufs`` with its true peak under the
    ceiling: each pass after the first corrects the gain by what the last one missed and
    lowers the limiter by what it overshot, ``PASSES`` at most. Silence (``measured``)
    keeps a gain of 0. Returns the last pass's loudness; a shortfall is logged.

    Two things end the passes early, because the limiter, not the gain, sets the level:
    a pass under the ceiling that came no closer to the target than the one before, and
    a pass whose loudness fell short by as much as the limiter cut the highest peak (the
    input's ``peak_db``, by default ``measured``'s true peak, plus the gain, above the
    limiter's ceiling): all of the audio was held down with its peaks, so more gain only
    limits harder. Music under a limiter loses a fraction of the cut; audio made of its
    peaks alone (the tiny test model's near-square waves) loses all of it."""
    gain, ceiling = gain_to(target_lufs, measured), LIMITER_DBTP
    peak = measured.true_peak_dbtp if peak_db is None else peak_db
    last_missed = math.inf
    for attempt in range(1, PASSES + 1):
        got = await one_pass(gain, ceiling)
        missed = target_lufs - got.integrated_lufs
        over = got.true_peak_dbtp - TRUE_PEAK_CEILING_DBTP
        if (measured.silent or abs(missed) <= TOLERANCE_LU) and over <= 0:
            return got
        if over <= 0 and abs(missed) > abs(last_missed) - STALLED_LU:
            break  # no closer
        cut = peak + gain - ceiling  # NaN where the peak is unknown: never true below
        if over <= 0 and 0 < cut <= missed + STALLED_LU:
            break  # as far as its peaks: all of it is held by the limiter
        last_missed = missed
        if attempt < PASSES:
            gain += 0 if measured.silent else missed
            ceiling -= max(0.0, over + 0.1)
    log.warning(
        "%s reached %.1f LUFS and %.1f dBTP for a target of %.1f LUFS under %.1f dBTP",
        what,
        got.integrated_lufs,
        got.true_peak_dbtp,
        target_lufs,
        TRUE_PEAK_CEILING_DBTP,
    )
    return got


def estimate(samples: Audio, sample_rate: int) -> Loudness:
    """The integrated loudness of samples in memory, in this process (pyloudnorm's
    BS.1770-4, the measure ebur128 makes: within 0.1 LU of it on music, noise and the
    tiny model's output). Audio shorter than one 400 ms gating block, or silent, reads
    ``SILENT_LUFS``, as ebur128 reads it. The true peak is not estimated (NaN): the
    passes that follow measure it with ebur128."""
    meter = pyloudnorm.Meter(sample_rate)
    if len(samples) < meter.block_size * sample_rate:
        return Loudness(SILENT_LUFS, math.nan)
    with np.errstate(divide="ignore"):  # silence: log10(0)
        lufs = float(meter.integrated_loudness(np.asarray(samples, dtype=np.float64)))
    return Loudness(max(SILENT_LUFS, lufs) if math.isfinite(lufs) else SILENT_LUFS, math.nan)


async def _filtered(
    source: Path, filters: str, channels: int, limit: int, deadline: float, ffmpeg: str | None
) -> tuple[Audio, Loudness]:
    args = _filter_args(source, filters)
    try:
        result = await run_ffmpeg(args, deadline=deadline, ffmpeg=ffmpeg, stdout_limit=limit)
    except FFmpegTimeout:
        raise EngineUnavailable("FFmpeg did not match the loudness in time.") from None
    summary = _summary(result.stderr)
    if result.returncode != 0 or result.stdout_overflow or summary is None:
        await blame_ffmpeg(ffmpeg, "The loudness cannot be matched")
        tail = scrub_paths(result.stderr.strip()[-200:]) or "no summary"
        raise StorageUnavailable(f"The loudness could not be matched: {tail}.")
    data = np.frombuffer(result.stdout[: len(result.stdout) // 4 * 4], dtype="<f4")
    samples = data[: len(data) - len(data) % channels].reshape(-1, channels)
    return np.ascontiguousarray(samples, dtype=np.float32), summary


def _remove(path: Path) -> None:
    """Remove the copy; one a refusing disk keeps is swept from ``tmp/`` at start-up."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


async def _write_copy(path: Path, samples: Audio, sample_rate: int) -> None:
    """The 24-bit copy FFmpeg reads; a disk that refuses it is ``StorageUnavailable``."""
    with storing("the copy of the audio its loudness is measured on"):
        # A scratch copy, read once and removed: not fsynced.
        await asyncio.to_thread(
            functools.partial(write_wav, durable=False), path, samples, sample_rate, 24
        )


def _filter_args(source: Path, filters: str) -> list[str]:
    # The copy is our own WAV: named as one, FFmpeg skips probing the format (3 ms a pass).
    return [
        "-nostdin", "-hide_banner", "-nostats",
        "-f", "wav", "-i", str(source.absolute()),
        "-af", f"{filters},ebur128=peak=true:framelog=quiet",
        "-f", "f32le", "pipe:1",
    ]  # fmt: skip
