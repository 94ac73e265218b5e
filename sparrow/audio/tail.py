"""The end of a path of segments, as one array in another format.

A continuation is conditioned on the last seconds of the path root→parent as it
plays (``sparrow.models.played``). The segments of that path can differ in rate
and layout (a 44.1 kHz stereo upload followed by 32 kHz mono continuations), so
the tail is read by one FFmpeg process that trims each segment it needs to its
frames (``atrim`` counts frames exactly, so the tail ends exactly where the path
does), resamples and remixes it to the engine's format (a mono segment for a
stereo engine goes to both sides at full level, as the export plays it), and
concatenates them.

Where every segment it needs is already at the engine's rate, in its channels or
in mono, there is nothing to resample or mix: the frames are read from the WAVs
directly, the same floats FFmpeg would give (each sample over 2^15 or 2^23), with no
process to start. That is the usual case once a path has continuations of its own.
A file that is not what its segment says is left to FFmpeg, which reads it or says
why not.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import FFmpegTimeout, run_ffmpeg
from sparrow.audio.segments import Segment
from sparrow.audio.storage import scrub_paths
from sparrow.audio.wav import WavFormatError, float_samples, open_pcm, read_layout
from sparrow.errors import EngineUnavailable, StorageUnavailable

TIMEOUT_S = 60.0


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

    Fewer frames come back when the segments are shorter than ``seconds``. They are
    read from the WAVs where nothing needs converting, otherwise from FFmpeg through
    a pipe; either way reading needs no room on the disk. Raises ``EngineUnavailable``
    when FFmpeg is needed and broken (it fails its canary, or hangs) and
    ``StorageUnavailable`` when it works but cannot read the files.
    """
    wanted = round(seconds * sample_rate)
    if wanted <= 0 or not segments:
        return np.zeros((0, channels), dtype=np.float32)
    needed: list[tuple[Segment, int]] = []  # (segment, first frame), last segment first
    remaining = seconds
    for segment in reversed(segments):
        if segment.frames <= 0:
            continue
        start = max(0, segment.frames - math.ceil(remaining * segment.sample_rate))
        needed.append((segment, start))
        remaining -= (segment.frames - start) / segment.sample_rate
        if remaining <= 0:
            break
    needed.reverse()
    if not needed:
        return np.zeros((0, channels), dtype=np.float32)
    if all(_direct(segment, sample_rate, channels) for segment, _ in needed):
        try:
            return await asyncio.to_thread(_read_direct, needed, wanted, channels)
        except (OSError, WavFormatError):
            pass  # not the file its segment describes: FFmpeg reads it, or says why not

    args: list[str] = ["-nostdin", "-hide_banner", "-loglevel", "error"]
    for segment, _ in needed:
        args += ["-f", "wav", "-i", str(segment.path.absolute())]
    layout = "mono" if channels == 1 else "stereo"
    convert = f"aresample={sample_rate},aformat=sample_fmts=flt:channel_layouts={layout}"

    def chain(i: int, segment: Segment, start: int) -> str:
        steps = [f"atrim=start_sample={start}:end_sample={segment.frames}", "asetpts=PTS-STARTPTS"]
        if segment.channels == 1 and channels == 2:
            # Both sides at full level, as a player plays mono (FFmpeg's upmix is -3 dB).
            steps.append("pan=stereo|c0=c0|c1=c0")
        return f"[{i}:a]{','.join([*steps, convert])}[a{i}]"

    chains = [chain(i, segment, start) for i, (segment, start) in enumerate(needed)]
    joined = "".join(f"[a{i}]" for i in range(len(needed)))
    graph = ";".join([*chains, f"{joined}concat=n={len(needed)}:v=0:a=1[out]"])

    args += ["-filter_complex", graph, "-map", "[out]", "-f", "f32le", "pipe:1"]
    require_ffmpeg_not_known_broken(ffmpeg, "The stored audio cannot be read")
    deadline = asyncio.get_running_loop().time() + timeout_s
    # The trims leave about ``wanted`` frames to read; a second more is slack.
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
    expected = min(
        wanted, round(sum((s.frames - start) / s.sample_rate for s, start in needed) * sample_rate)
    )
    if abs(len(samples) - expected) > 4 * len(needed) + 16:
        await blame_ffmpeg(ffmpeg, "The stored audio cannot be read")
        raise StorageUnavailable(
            f"Reading the stored audio gave {len(samples)} frames instead of {expected}."
        )
    return np.ascontiguousarray(samples[-wanted:], dtype=np.float32)


def _direct(segment: Segment, sample_rate: int, channels: int) -> bool:
    """Whether the segment's frames are the engine's as they are (at most mono copied to
    both sides)."""
    return segment.sample_rate == sample_rate and segment.channels in (channels, 1)


def _read_direct(
    needed: Sequence[tuple[Segment, int]], wanted: int, channels: int
) -> npt.NDArray[np.float32]:
    """The tail read from the WAVs themselves (see the module docstring)."""
    parts = []
    for segment, start in needed:
        layout = read_layout(segment.path)
        if (layout.sample_rate, layout.channels) != (segment.sample_rate, segment.channels):
            raise WavFormatError(f"{segment.path.name}: not the segment's format")
        if layout.frames < segment.frames:
            raise WavFormatError(f"{segment.path.name}: shorter than its segment")
        samples = float_samples(open_pcm(segment.path, layout)[start : segment.frames], layout.bits)
        parts.append(
            np.repeat(samples, channels, axis=1) if layout.channels != channels else samples
        )
    return np.ascontiguousarray(np.concatenate(parts)[-wanted:], dtype=np.float32)
