"""Loudness as EBU R128 measures it, with FFmpeg's ``ebur128`` filter, and the filter
that brings audio to a target loudness under a true-peak ceiling.

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
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import FFmpegTimeout, run_ffmpeg
from sparrow.audio.storage import scrub_paths
from sparrow.errors import EngineUnavailable, StorageUnavailable

MIN_LUFS = -40.0
MAX_LUFS = -5.0
TRUE_PEAK_CEILING_DBTP = -1.0
# The limiter aims below the ceiling at first: its 4× oversampling is close to, not
# exactly, ebur128's, and an MP3's true peak rises when it is decoded (by up to 0.7 dB
# for loud material here). A pass that still overshoots lowers it by the overshoot.
LIMITER_DBTP = -1.5
SILENT_LUFS = -70.0  # ebur128's absolute gate: nothing louder was heard
TIMEOUT_S = 120.0

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
    path: Path, *, ffmpeg: str | None = None, timeout_s: float = TIMEOUT_S
) -> Loudness:
    """The file's integrated loudness and true peak."""
    require_ffmpeg_not_known_broken(ffmpeg, "The loudness cannot be measured")
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        result = await run_ffmpeg(_measure_args(path), deadline=deadline, ffmpeg=ffmpeg)
    except FFmpegTimeout:
        raise EngineUnavailable(
            f"FFmpeg did not measure the loudness within {timeout_s:g} s."
        ) from None
    integrated = _INTEGRATED.search(result.stderr)
    peak = _TRUE_PEAK.search(result.stderr)
    if result.returncode != 0 or integrated is None or peak is None:
        await blame_ffmpeg(ffmpeg, "The loudness cannot be measured")
        tail = scrub_paths(result.stderr.strip()[-200:]) or "no summary"
        raise StorageUnavailable(f"The loudness could not be measured: {tail}.")
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
