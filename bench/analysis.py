"""What a node's analysis and a continuation's loudness matching cost, against reading
the same audio once with FFmpeg, in the same run.

    python -m bench.analysis [--seconds 30] [--repeat 5]

On ``render_music`` audio at 32 kHz mono (MusicGen's format), median of
``--repeat``, sampled interleaved:

- ``analysis``: a node's whole analysis as the analyser makes it — loudness and
  true peak with FFmpeg's ``ebur128``, then tempo and key with librosa (after its
  one-time warm-up, which is timed on its own);
- ``match``: ``loudness.match`` bringing the audio to another loudness (written
  to a temporary WAV, measured, gained under the true-peak limiter, measured
  again), as every continuation is by default;
- ``read``: baseline — FFmpeg decoding the same WAV to nothing (``-f null``).

The issue's budget: a 30 s node is analysed in under a second on one CPU core,
asserted here.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.table import Options, Row
from bench.timing import interleaved
from sparrow.audio import loudness, render_music, write_wav
from sparrow.audio.analysis import warm
from sparrow.audio.ffmpeg import run_ffmpeg
from sparrow.domain.analysis import analyse_audio

RATE = 32_000
BUDGET_S = 1.0  # for a 30 s node


async def read(path: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    args = ["-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "null", "-"]
    result = await run_ffmpeg(args, deadline=deadline)
    assert result.returncode == 0, result.stderr[-300:]


async def measure(seconds: float, repeat: int) -> dict[str, float]:
    """Median seconds of each step, and of the warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        samples = render_music(seconds, RATE, 1, seed=5)
        path = folder / "node.wav"
        write_wav(path, samples, RATE)
        started = time.perf_counter()
        await asyncio.to_thread(warm)
        warm_s = time.perf_counter() - started

        async def match() -> None:
            await loudness.match(samples, RATE, -16.0, folder=folder)

        times = await interleaved(
            {"analysis": lambda: analyse_audio(path), "match": match, "read": lambda: read(path)},
            repeat,
        )
        return {**times, "warm": warm_s, "seconds": seconds}


def rows_of(t: dict[str, float]) -> list[Row]:
    seconds = t["seconds"]
    return [
        Row(
            f"analysis of a {seconds:g} s node (ebur128 + librosa) vs FFmpeg reading it",
            seconds / t["analysis"],
            seconds / t["read"],
            "audio s/s",
        ),
        Row(
            f"loudness matching of a {seconds:g} s continuation vs FFmpeg reading it",
            seconds / t["match"],
            seconds / t["read"],
            "audio s/s",
        ),
    ]


def table_rows(options: Options) -> list[Row]:
    t = asyncio.run(measure(30.0, 3 if options.quick else 7))
    assert t["analysis"] < BUDGET_S, f"a 30 s node took {t['analysis']:.2f} s to analyse"
    return rows_of(t)


def main(seconds: float, repeat: int) -> None:
    t = asyncio.run(measure(seconds, repeat))
    print(f"librosa warm-up (once per process): {t['warm']:.2f} s")
    for step in ("analysis", "match", "read"):
        print(f"{step:<9}{t[step] * 1000:>9.0f} ms   {seconds / t[step]:>7.0f}× realtime")
    if seconds <= 30:
        assert t["analysis"] < BUDGET_S, f"a {seconds:g} s node took {t['analysis']:.2f} s"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    main(args.seconds, args.repeat)
