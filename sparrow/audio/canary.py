"""Whether FFmpeg really works: one real run on a known input, its output checked.

That the binary exists says little: an FFmpeg can be present and still fail
every run (a broken library, a missing codec), hang, or exit 0 having written
nothing or garbage. ``ffmpeg_problem`` renders a quarter second of FFmpeg's
own sine source to raw PCM on a pipe and compares every sample with the sine
it must be. It answers None when FFmpeg works, else a sentence saying how it
fails (no path in it).

It serves two callers. ``/readyz`` asks with ``trust_healthy_s`` of a few
seconds, so a probe is cheap. A decode or an export that failed asks with 0
whenever the last answer was "works", so that a file FFmpeg cannot read is
told apart from an FFmpeg that cannot read anything: only the first is the
client's fault (422), the second is the server's (503 ``engine_unavailable``).
A failing answer is trusted for ``FAILING_TRUSTED_S``, and work about to run
FFmpeg meanwhile fails at once (``require_ffmpeg_not_known_broken``), so a hung
FFmpeg costs one canary timeout, not one time limit per request or job.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from sparrow.audio.ffmpeg import FFmpegNotFound, FFmpegTimeout, ffmpeg_exe, run_ffmpeg
from sparrow.errors import EngineUnavailable

CANARY_TIMEOUT_S = 3.0
FAILING_TRUSTED_S = 5.0
_RATE, _FREQUENCY, _SECONDS = 8000, 500, 0.25
_FRAMES = round(_RATE * _SECONDS)
_ARGS = [
    "-nostdin", "-hide_banner", "-loglevel", "error",
    "-f", "lavfi", "-i", f"sine=frequency={_FREQUENCY}:sample_rate={_RATE}:duration={_SECONDS}",
    "-c:a", "pcm_s16le", "-f", "s16le", "pipe:1",
]  # fmt: skip
# FFmpeg's sine source: one eighth of full scale, starting at phase 0.
_EXPECTED = np.sin(2 * np.pi * _FREQUENCY * np.arange(_FRAMES) / _RATE) * (32768 / 8)
_TOLERANCE = 64  # rounding differs by one or two; anything else is not that sine

_last: dict[str, tuple[float, str | None]] = {}  # binary → (when, problem)


async def ffmpeg_problem(ffmpeg: str | None, *, trust_healthy_s: float) -> str | None:
    """None if FFmpeg works, else why not; see the module docstring for the caching."""
    try:
        key = ffmpeg_exe(ffmpeg)
    except FFmpegNotFound as exc:
        return exc.detail
    now = time.monotonic()
    seen = _last.get(key)
    if seen is not None:
        when, problem = seen
        trusted = FAILING_TRUSTED_S if problem is not None else trust_healthy_s
        if now - when < trusted:
            return problem
    problem = await _run_canary(ffmpeg)
    _last[key] = (time.monotonic(), problem)
    return problem


def require_ffmpeg_not_known_broken(ffmpeg: str | None, what: str) -> None:
    """Before a run: ``EngineUnavailable`` at once while a failing answer is trusted, so a
    hung FFmpeg costs one canary timeout rather than one time limit per piece of work."""
    try:
        seen = _last.get(ffmpeg_exe(ffmpeg))
    except FFmpegNotFound as exc:
        raise EngineUnavailable(f"{what} right now: {exc.detail}") from None
    if seen is not None and seen[1] is not None and time.monotonic() - seen[0] < FAILING_TRUSTED_S:
        raise EngineUnavailable(f"{what} right now: {seen[1]}")


async def blame_ffmpeg(ffmpeg: str | None, what: str) -> None:
    """After a failed run: ``EngineUnavailable`` ("``what`` right now: why") if FFmpeg
    itself is broken; nothing if it works, and the failure is its input's."""
    problem = await ffmpeg_problem(ffmpeg, trust_healthy_s=0)
    if problem is not None:
        raise EngineUnavailable(f"{what} right now: {problem}")


async def _run_canary(ffmpeg: str | None) -> str | None:
    deadline = asyncio.get_running_loop().time() + CANARY_TIMEOUT_S
    try:
        result = await run_ffmpeg(_ARGS, deadline=deadline, ffmpeg=ffmpeg, stdout_limit=_FRAMES * 2)
    except FFmpegNotFound as exc:
        return exc.detail
    except FFmpegTimeout:
        return f"FFmpeg did not finish a {_SECONDS:g} s test render in {CANARY_TIMEOUT_S:g} s."
    if result.returncode != 0:
        return f"FFmpeg fails a test render (exit status {result.returncode})."
    samples = np.frombuffer(result.stdout[: len(result.stdout) // 2 * 2], dtype="<i2")
    if result.stdout_overflow or len(samples) != _FRAMES:
        return (
            f"FFmpeg's test render has {len(samples)} samples instead of {_FRAMES}: "
            "its output cannot be trusted."
        )
    if np.abs(samples - _EXPECTED).max() > _TOLERANCE:
        return (
            "FFmpeg's test render is not the sine it was asked for: its output cannot be trusted."
        )
    return None
