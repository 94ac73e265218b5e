"""Spine export (crossfaded, exact length) against a plain FFmpeg concat, in the same run.

    python -m bench.export [--segments 30] [--seconds 20] [--repeat 3] [--crossfade-ms 20]

Builds a spine like a real one in a temporary folder: a 44.1 kHz stereo root
followed by 32 kHz mono continuations, ``render_music`` audio, ``--seconds``
each (30 × 20 s = 10 minutes by default). Then times, median of ``--repeat``:

- ``export``: ``join_segments`` — one FFmpeg process that resamples, pins each
  segment's length, crossfades the joins and encodes;
- ``concat``: baseline — one FFmpeg process over the same files that resamples
  them and joins them with the ``concat`` filter (no crossfades, no length
  pinning), encoded the same way.

Both run through ``run_ffmpeg`` (same limits, same binary), to WAV and to MP3,
sampled interleaved. The ratio export/concat is what the crossfades and exact
lengths cost.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.table import Options, Row
from bench.timing import interleaved
from sparrow.audio import render_music, write_wav
from sparrow.audio.ffmpeg import ffmpeg_exe, run_ffmpeg
from sparrow.audio.join import MP3_QUALITY, ExportFormat, join_segments
from sparrow.audio.wav import read_layout

ROOT = (44_100, 2)
CONTINUATION = (32_000, 1)
CODECS: dict[ExportFormat, list[str]] = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-q:a", str(MP3_QUALITY)],
}
MAX_RATIO = 3.0


def build(folder: Path, segments: int, seconds: float) -> list[Path]:
    """WAV files of a spine like a real one: a 44.1 kHz stereo root, 32 kHz mono after it."""
    paths = []
    for i in range(segments):
        rate, channels = ROOT if i == 0 else CONTINUATION
        path = folder / f"seg{i:03d}.wav"
        write_wav(path, render_music(seconds, rate, channels, seed=i), rate)
        paths.append(path)
    return paths


async def concat(paths: list[Path], dst: Path, export: ExportFormat) -> None:
    """The baseline: resample every segment to 44.1 kHz stereo and concatenate."""
    args = ["-nostdin", "-hide_banner", "-loglevel", "error"]
    for path in paths:
        args += ["-f", "wav", "-i", str(path)]
    chains = [
        f"[{i}:a]aresample=44100,aformat=sample_fmts=flt:channel_layouts=stereo[a{i}]"
        for i in range(len(paths))
    ]
    joined = "".join(f"[a{i}]" for i in range(len(paths)))
    graph = ";".join([*chains, f"{joined}concat=n={len(paths)}:v=0:a=1[out]"])
    args += ["-filter_complex", graph, "-map", "[out]", *CODECS[export], "-f", export, "-y"]
    deadline = asyncio.get_running_loop().time() + 600
    result = await run_ffmpeg([*args, str(dst)], deadline=deadline, memory_bytes=8 << 30)
    assert result.returncode == 0, result.stderr[-300:]


async def measure(
    paths: list[Path], folder: Path, export: ExportFormat, crossfade_ms: float, repeat: int
) -> tuple[float, float]:
    """(export, concat): median seconds of each, sampled interleaved, writing to ``folder``."""

    async def run_export() -> None:
        await join_segments(
            paths, folder / f"spine.{export}", format=export, crossfade_ms=crossfade_ms
        )

    async def run_concat() -> None:
        await concat(paths, folder / f"concat.{export}", export)

    t = await interleaved({"export": run_export, "concat": run_concat}, repeat)
    return t["export"], t["concat"]


@dataclass(frozen=True)
class Sizes:
    segments: int
    seconds: float
    repeat: int


QUICK = Sizes(segments=10, seconds=10.0, repeat=2)
FULL = Sizes(segments=30, seconds=20.0, repeat=5)


async def rows_for(sizes: Sizes, crossfade_ms: float = 20.0) -> list[Row]:
    """Export against concat, WAV and MP3, as seconds of audio written per wall second."""
    audio_s = sizes.segments * sizes.seconds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build(folder, sizes.segments, sizes.seconds)
        for export in CODECS:
            t_export, t_concat = await measure(paths, folder, export, crossfade_ms, sizes.repeat)
            rows.append(
                Row(
                    f"export of a {audio_s:g} s spine ({sizes.segments} nodes) to "
                    f"{export.upper()} vs ffmpeg concat",
                    audio_s / t_export,
                    audio_s / t_concat,
                    "audio s/s",
                )
            )
    return rows


def table_rows(options: Options) -> list[Row]:
    return asyncio.run(rows_for(QUICK if options.quick else FULL))


async def main(segments: int, seconds: float, repeat: int, crossfade_ms: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths = build(folder, segments, seconds)
        print(
            f"built {segments} segments of {seconds:g} s (1 × 44.1 kHz stereo, "
            f"{segments - 1} × 32 kHz mono) in {time.perf_counter() - started:.1f} s; "
            f"FFmpeg: {ffmpeg_exe()}"
        )

        plan = await join_segments(
            paths, folder / "check.wav", format="wav", crossfade_ms=crossfade_ms
        )
        assert read_layout(folder / "check.wav").frames == plan.total_frames, "length is off"
        print(
            f"export: {plan.sample_rate} Hz, {plan.channels} ch, {plan.total_frames} frames "
            f"({plan.duration_s:.2f} s), crossfades of {plan.crossfade_frames} frames"
        )

        rows = []
        for export in CODECS:
            t_export, t_concat = await measure(paths, folder, export, crossfade_ms, repeat)
            rows.append((export, t_export, t_concat))

    audio_s = segments * seconds
    print(f"\n{'format':<8}{'export s':>10}{'concat s':>10}{'× concat':>10}{'× realtime':>12}")
    for export, t_export, t_concat in rows:
        print(
            f"{export:<8}{t_export:>10.2f}{t_concat:>10.2f}{t_export / t_concat:>10.2f}"
            f"{audio_s / t_export:>12.0f}"
        )
    for export, t_export, t_concat in rows:
        assert t_export / t_concat < MAX_RATIO, f"{export} export is far slower than concat"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--crossfade-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.segments, args.seconds, args.repeat, args.crossfade_ms))
