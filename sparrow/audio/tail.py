"""The end of a path of segments, as one array in another format.

A continuation is conditioned on the last seconds of the path root→parent. The
segments of that path can differ in rate and layout (a 44.1 kHz stereo upload
followed by 32 kHz mono continuations), so the tail is read by one FFmpeg
process that seeks into the first segment it needs, resamples and remixes each
segment to the engine's format, and concatenates them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import FFmpegTimeout, run_ffmpeg
from sparrow.audio.storage import scrub_paths
from sparrow.errors import EngineUnavailable, StorageUnavailable

TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Segment:
    path: Path
    duration_s: float


async def read_tail(
    segments: Sequence[Segment],
    seconds: float,
    *,
    sample_rate: int,
    channels: int,
    ffmpeg: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> npt.NDArray[np.float32]:
    """The last ``seconds`` of the segments played back to back, float32 (frames, channels).

    Fewer frames come back when the segments are shorter than ``seconds``. The
    samples come back through a pipe, so reading needs no room on the disk. Raises
    ``EngineUnavailable`` when FFmpeg is broken (it fails its canary, or hangs) and
    ``StorageUnavailable`` when it works but cannot read the files.
    """
    wanted = round(seconds * sample_rate)
    if wanted <= 0 or not segments:
        return np.zeros((0, channels), dtype=np.float32)
    needed: list[tuple[Segment, float]] = []  # (segment, start offset), last segment first
    remaining = seconds
    for segment in reversed(segments):
        start = max(0.0, segment.duration_s - remaining)
        needed.append((segment, start))
        remaining -= segment.duration_s - start
        if remaining <= 0:
            break
    needed.reverse()

    args: list[str] = ["-nostdin", "-hide_banner", "-loglevel", "error"]
    for segment, start in needed:
        if start > 0:
            args += ["-ss", f"{start:.6f}"]
        args += ["-i", str(segment.path)]
    layout = "mono" if channels == 1 else "stereo"
    convert = f"aresample={sample_rate},aformat=sample_fmts=flt:channel_layouts={layout}"
    chains = [f"[{i}:a]{convert}[a{i}]" for i in range(len(needed))]
    joined = "".join(f"[a{i}]" for i in range(len(needed)))
    graph = ";".join([*chains, f"{joined}concat=n={len(needed)}:v=0:a=1[out]"])

    args += ["-filter_complex", graph, "-map", "[out]", "-f", "f32le", "pipe:1"]
    require_ffmpeg_not_known_broken(ffmpeg, "The stored audio cannot be read")
    deadline = asyncio.get_running_loop().time() + timeout_s
    # Seeking leaves about ``wanted`` frames to read; a second more is slack.
    limit = (wanted + sample_rate) * channels * 4
    try:
        result = await run_ffmpeg(args, deadline=deadline, ffmpeg=ffmpeg, stdout_limit=limit)
    except FFmpegTimeout:
        raise EngineUnavailable(
            f"FFmpeg did not read the stored audio within {timeout_s:g} s."
        ) from None
    if result.returncode != 0 or result.stdout_overflow:
        await blame_ffmpeg(ffmpeg, "The stored audio cannot be read")
        raise StorageUnavailable(
            "The stored audio could not be read: "
            f"{scrub_paths(result.stderr.strip()[-200:]) or 'FFmpeg gave no reason'}."
        )
    samples = np.frombuffer(result.stdout[: len(result.stdout) // 4 * 4], dtype="<f4")
    samples = samples[: len(samples) - len(samples) % channels].reshape(-1, channels)
    # What the segments hold, give or take the resampler's rounding at each one.
    expected = min(wanted, round(sum(s.duration_s - start for s, start in needed) * sample_rate))
    if abs(len(samples) - expected) > 4 * len(needed) + 16:
        await blame_ffmpeg(ffmpeg, "The stored audio cannot be read")
        raise StorageUnavailable(
            f"Reading the stored audio gave {len(samples)} frames instead of {expected}."
        )
    return np.ascontiguousarray(samples[-wanted:], dtype=np.float32)
