"""The end of a path of segments, as one array in another format.

A continuation is conditioned on the last seconds of the path root→parent. The
segments of that path can differ in rate and layout (a 44.1 kHz stereo upload
followed by 32 kHz mono continuations), so the tail is read by one FFmpeg
process that seeks into the first segment it needs, resamples and remixes each
segment to the engine's format, and concatenates them.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sparrow.audio.ffmpeg import FFmpegTimeout, run_ffmpeg
from sparrow.errors import GenerationFailed

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
    tmp_dir: Path,
    ffmpeg: str | None = None,
) -> npt.NDArray[np.float32]:
    """The last ``seconds`` of the segments played back to back, float32 (frames, channels).

    Fewer frames come back when the segments are shorter than ``seconds``.
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

    with tempfile.TemporaryDirectory(dir=tmp_dir) as work:
        raw = Path(work) / "tail.f32"
        args += ["-filter_complex", graph, "-map", "[out]", "-f", "f32le", "-y", str(raw)]
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        try:
            result = await run_ffmpeg(args, deadline=deadline, ffmpeg=ffmpeg)
        except FFmpegTimeout:
            raise GenerationFailed("Reading the parent audio took too long.") from None
        if result.returncode != 0 or not raw.is_file():
            raise GenerationFailed(f"The parent audio could not be read: {result.stderr[-300:]}")
        samples = np.fromfile(raw, dtype="<f4")
    samples = samples[: len(samples) - len(samples) % channels].reshape(-1, channels)
    return np.ascontiguousarray(samples[-wanted:], dtype=np.float32)
