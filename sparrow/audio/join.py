"""Exporting the spine as one file: one FFmpeg process over all of its segments.

The spine's segments are canonical WAVs that may differ in rate and layout (a
44.1 kHz stereo upload followed by 32 kHz mono continuations). ``plan_join``
reads their headers and fixes the output format:

- rate R: the highest segment rate; for MP3 the smallest MPEG-1 rate (32, 44.1
  or 48 kHz) not below it, at most 48 kHz (44.1 kHz for 88.2 and 176.4 kHz);
- channels: stereo if any segment has two or more, else mono. A mono segment is
  copied to both sides at full level, as a player plays it (FFmpeg's own
  upmix would lower it by 3 dB). More than two channels are downmixed by
  averaging the even ones into the left and the odd ones into the right, as
  ``decode`` does for channels without positions;
- WAV and FLAC are 24-bit if any segment is, else 16-bit; MP3 is libmp3lame
  VBR ``-q:a 2`` (about 190 kbit/s) with its LAME tag, so decoders trim the
  encoder's padding and the MP3 decodes to the same length.

A segment plays its file whole, or only its first p_i frames (a ``Segment``: an
ancestor on a path plays up to where its child begins, ``sparrow.models.played``);
such a segment is trimmed to them (``atrim=end_sample=p_i``) before anything else.
Segment i (r_i Hz, f_i frames that play) lasts n_i = round(f_i·R/r_i) frames at R, and
each of the k-1 joins overlaps X = round(crossfade_ms·R/1000) frames, so the
export has exactly sum(n_i) - (k-1)·X frames. The graph, for X > 0::

    [i:a] (atrim) (downmix) aresample=R (upmix) aformat=flt apad=whole_len=n_i
          atrim=end_sample=n_i asplit → [b_i] first n_i - X frames
                                      → [t_i] last X frames
    [t_i-1][b_i] acrossfade=ns=X:c1=qsin:c2=qsin [j_i]
    [b_0][j_1]…[j_k-1] concat → out

apad then atrim pin each segment to n_i frames, whatever the resampler's
rounding. ``acrossfade`` fades the previous segment's last X frames out by cos
and this segment's first X in by sin (equal power: the right sum for
uncorrelated audio), then passes the rest of the segment through. So every
frame goes through a fixed number of filters however long the spine (a chain
of ``acrossfade`` filters would pass the first segment through all k-1 of
them), and ``concat`` reads its inputs in turn, so only a few frames of each
segment are held at a time. With X = 0 the segments go straight to ``concat``.

The graph is passed inline: FFmpeg 5.1 reads a graph file only with
``-filter_complex_script`` and FFmpeg 9 only with ``-/filter_complex``.
``MAX_SEGMENTS`` keeps the argument well below Linux's 128 KiB limit on one.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mutagen
import mutagen.flac
import mutagen.mp3

from sparrow.audio import loudness
from sparrow.audio.atomic import publish, temp_path_for
from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import MEMORY_LIMIT_BYTES, FFmpegTimeout, run_ffmpeg
from sparrow.audio.segments import Segment
from sparrow.audio.storage import raise_if_storage_failed, scrub_paths, storing
from sparrow.audio.wav import WavFormatError, WavLayout, read_layout
from sparrow.errors import EngineUnavailable, InvalidInput, StorageUnavailable

ExportFormat = Literal["wav", "mp3", "flac"]
MEDIA_TYPES: dict[ExportFormat, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
}
DEFAULT_CROSSFADE_MS = 20.0
MAX_CROSSFADE_MS = 1000.0
MAX_SEGMENTS = 300
MP3_RATES = (32_000, 44_100, 48_000)
MP3_QUALITY = 2
TIMEOUT_S = 300.0
# FFmpeg 7+ runs a demuxer and a decoder thread per input, and each thread's
# 8 MiB stack counts against the address-space limit (measured: 17 MiB more
# per segment with FFmpeg 9, 10 MiB with 5.1).
_MEMORY_PER_SEGMENT = 32 << 20
# A RIFF size field is 32 bits; the header of a canonical WAV is under 64 bytes.
_MAX_WAV_BITS = (0xFFFF_FFFF - 64) * 8
_STDERR_TAIL = 300
# mutagen's MP3 length counts whole MPEG frames, encoder delay and padding included.
_MP3_SLACK_FRAMES = 3 * 1152

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinPlan:
    """The export's format and length, decided from the segments' headers."""

    sample_rate: int
    channels: int
    bits: int | None
    """16 or 24 for WAV and FLAC; None for MP3."""
    segment_frames: tuple[int, ...]
    """Each segment's length at ``sample_rate``, before crossfades."""
    segment_channels: tuple[int, ...]
    """Each segment's own channel count."""
    segment_cuts: tuple[int | None, ...]
    """The frames that play of each segment's file, at its own rate; None: all of them."""
    crossfade_frames: int
    total_frames: int

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.sample_rate


Source = Path | Segment
"""A WAV that plays whole (a path), or its first frames (a ``Segment``)."""


def plan_join(paths: Sequence[Source], *, format: ExportFormat, crossfade_ms: float) -> JoinPlan:
    """The plan for joining the WAVs at ``paths`` (headers only, no samples read).

    Raises ``InvalidInput`` for no segments, more than ``MAX_SEGMENTS``, a
    crossfade outside 0–``MAX_CROSSFADE_MS`` or longer than a segment can give
    (an end segment needs X frames, an interior one 2·X), or a WAV over 4 GiB;
    ``StorageUnavailable`` when a segment's file is missing or not a canonical WAV.
    """
    if format not in MEDIA_TYPES:
        raise InvalidInput(f"Cannot export as {format!r}: choose one of {', '.join(MEDIA_TYPES)}.")
    if not paths:
        raise InvalidInput("There is no audio to export.")
    if len(paths) > MAX_SEGMENTS:
        raise InvalidInput(
            f"A spine of {len(paths)} nodes is too long to export ({MAX_SEGMENTS} at most)."
        )
    if not 0 <= crossfade_ms <= MAX_CROSSFADE_MS:  # also refuses NaN
        raise InvalidInput(f"crossfade_ms must be between 0 and {MAX_CROSSFADE_MS:g}.")
    layouts = [_read_segment(_path(path), i) for i, path in enumerate(paths)]
    cuts = tuple(
        _cut(path, layout, i) for i, (path, layout) in enumerate(zip(paths, layouts, strict=True))
    )
    top = max(layout.sample_rate for layout in layouts)
    rate = _mp3_rate(top) if format == "mp3" else top
    frames = tuple(
        round((layout.frames if cut is None else cut) * rate / layout.sample_rate)
        for layout, cut in zip(layouts, cuts, strict=True)
    )
    fade = round(crossfade_ms * rate / 1000) if len(paths) > 1 else 0
    for i, n in enumerate(frames):
        needed = fade if i in (0, len(frames) - 1) else 2 * fade
        if n < needed:
            where = "at each of its ends" if needed > fade else "at its join"
            raise InvalidInput(
                f"Segment {i + 1} of {len(frames)} lasts {n / rate * 1000:.1f} ms, too short "
                f"for a {crossfade_ms:g} ms crossfade {where}."
            )
    plan = JoinPlan(
        sample_rate=rate,
        channels=2 if any(layout.channels >= 2 for layout in layouts) else 1,
        bits=None if format == "mp3" else max(layout.bits for layout in layouts),
        segment_frames=frames,
        segment_channels=tuple(layout.channels for layout in layouts),
        segment_cuts=cuts,
        crossfade_frames=fade,
        total_frames=sum(frames) - (len(frames) - 1) * fade,
    )
    wav_bits = plan.total_frames * plan.channels * (plan.bits or 0)
    if format == "wav" and wav_bits > _MAX_WAV_BITS:
        raise InvalidInput("The spine is too long for a WAV file (4 GiB at most); export FLAC.")
    return plan


async def join_segments(
    paths: Sequence[Source],
    dst: Path,
    *,
    format: ExportFormat,
    crossfade_ms: float = DEFAULT_CROSSFADE_MS,
    loudness_lufs: float | None = None,
    ffmpeg: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> JoinPlan:
    """Join the WAVs at ``paths`` into one ``format`` file published atomically at ``dst``.

    ``dst``'s folder must exist; nothing appears at ``dst`` (and no temporary
    file is left) unless the export succeeds and its file passes
    ``output_problem``. Raises what ``plan_join`` raises; ``EngineUnavailable``
    when FFmpeg is broken (it fails its canary, runs past ``timeout_s``, or writes
    a file that fails the check); ``StorageUnavailable`` when the file cannot be
    written or FFmpeg fails otherwise.

    ``loudness_lufs``: the mix is joined to a float WAV first, measured, and encoded
    with the gain that brings it to that integrated loudness under a true-peak
    limiter (``sparrow.audio.loudness``); the encoded file is measured again and,
    while it is more than ``loudness.TOLERANCE_LU`` off, encoded again with the gain
    corrected by what it missed (the limiter takes some of the gain from loud
    material), at most ``loudness.PASSES`` times in all.

    FFmpeg writes into a hidden folder of its own next to ``dst``. FFmpeg is a
    process of its own and outlives a server killed with SIGKILL; the start-up
    sweep removes hidden names among a chain's exports, folder and all, so the file
    such an FFmpeg already had open goes with it, and one it has yet to open cannot
    be created any more (a temporary file beside ``dst`` could appear after the
    sweep and stay).
    """
    plan = await asyncio.to_thread(plan_join, paths, format=format, crossfade_ms=crossfade_ms)
    require_ffmpeg_not_known_broken(ffmpeg, "The spine cannot be exported")
    deadline = asyncio.get_running_loop().time() + timeout_s
    work = temp_path_for(dst)
    tmp = work / dst.name
    with storing("writing the export"):
        await asyncio.to_thread(work.mkdir)
    try:
        mix = tmp if loudness_lufs is None else work / "mix.wav"
        await _run(
            _args(paths, plan, "wav" if mix is not tmp else format, mix, float_wav=mix is not tmp),
            deadline,
            ffmpeg,
            memory_bytes=MEMORY_LIMIT_BYTES + len(paths) * _MEMORY_PER_SEGMENT,
        )
        if loudness_lufs is not None:
            await _normalize(mix, tmp, plan, format, loudness_lufs, deadline, ffmpeg)
        problem = await asyncio.to_thread(output_problem, tmp, plan, format)
        if problem is not None:
            log.error("FFmpeg wrote a bad export (%s); it is not kept", problem)
            raise EngineUnavailable(
                f"FFmpeg wrote an export that fails its check ({problem}); it was not kept."
            )
        with storing("writing the export"):
            await asyncio.to_thread(publish, tmp, dst)
    except FFmpegTimeout:
        raise EngineUnavailable(f"Exporting the spine took longer than {timeout_s:g} s.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # FFmpeg has ended: run_ffmpeg waits for it
    return plan


async def _run(
    args: list[str], deadline: float, ffmpeg: str | None, *, memory_bytes: int | None = None
) -> None:
    kwargs: dict[str, Any] = {} if memory_bytes is None else {"memory_bytes": memory_bytes}
    result = await run_ffmpeg(args, deadline=deadline, ffmpeg=ffmpeg, **kwargs)
    if result.returncode != 0:
        raise_if_storage_failed(result.stderr, "the export")
        await blame_ffmpeg(ffmpeg, "The spine cannot be exported")
        tail = scrub_paths(result.stderr.strip()[-_STDERR_TAIL:]) or "no reason given"
        raise StorageUnavailable(f"The spine could not be exported: {tail}")


async def _normalize(
    mix: Path,
    tmp: Path,
    plan: JoinPlan,
    format: ExportFormat,
    target_lufs: float,
    deadline: float,
    ffmpeg: str | None,
) -> None:
    """Encode ``mix`` to ``tmp`` at ``target_lufs`` (see ``join_segments``)."""
    remaining = deadline - asyncio.get_running_loop().time()
    measured = await loudness.measure(mix, ffmpeg=ffmpeg, timeout_s=remaining)

    async def one_pass(gain_db: float, ceiling_dbtp: float) -> loudness.Loudness:
        await _run(_encode_args(mix, gain_db, ceiling_dbtp, plan, format, tmp), deadline, ffmpeg)
        remaining = deadline - asyncio.get_running_loop().time()
        return await loudness.measure(tmp, ffmpeg=ffmpeg, timeout_s=remaining)

    await loudness.converge(target_lufs, measured, one_pass, "the export")


def output_problem(path: Path, plan: JoinPlan, format: ExportFormat) -> str | None:
    """Why the file at ``path`` is not the export ``plan`` describes, or None if it is.

    WAV: Sparrow's own reader, exact frames and size. FLAC: its STREAMINFO (exact
    samples). MP3: its frame headers and Xing/LAME tag as mutagen reads them; that
    length counts the encoder's padding, so it may exceed the plan by a few frames.
    """
    try:
        if format == "wav":
            layout = read_layout(path)
            rate, channels, frames = layout.sample_rate, layout.channels, layout.frames
            data = frames * layout.block_align
            if path.stat().st_size != layout.data_offset + data + (data & 1):
                return "its size does not match its header"
            if layout.bits != plan.bits:
                return f"it has {layout.bits}-bit samples instead of {plan.bits}-bit"
        elif format == "flac":
            flac: Any = mutagen.flac.FLAC(path).info  # type: ignore[no-untyped-call]
            rate, channels, frames = flac.sample_rate, flac.channels, flac.total_samples
        else:
            mp3: Any = mutagen.mp3.MP3(path).info  # type: ignore[no-untyped-call]
            rate, channels = mp3.sample_rate, mp3.channels
            frames = round(mp3.length * mp3.sample_rate)
    except (OSError, WavFormatError, mutagen.MutagenError) as exc:
        return f"it is not a readable {format} file ({type(exc).__name__})"
    if (rate, channels) != (plan.sample_rate, plan.channels):
        return (
            f"it is {rate} Hz in {channels} channels, not {plan.sample_rate} Hz in {plan.channels}"
        )
    slack = _MP3_SLACK_FRAMES if format == "mp3" else 0
    if not plan.total_frames <= frames <= plan.total_frames + slack:
        return f"it holds {frames} frames instead of {plan.total_frames}"
    return None


def _path(played: Source) -> Path:
    return played if isinstance(played, Path) else played.path


def _cut(played: Source, layout: WavLayout, index: int) -> int | None:
    """The frames of a segment's file that play, if not all of them."""
    if isinstance(played, Path) or played.frames >= layout.frames:
        return None
    if played.sample_rate != layout.sample_rate:
        raise StorageUnavailable(
            f"The audio of segment {index + 1} is at {layout.sample_rate} Hz, "
            f"not the {played.sample_rate} Hz recorded."
        )
    return max(0, played.frames)


def _read_segment(path: Path, index: int) -> WavLayout:
    try:
        return read_layout(path)
    except (OSError, WavFormatError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StorageUnavailable(
            f"The audio of segment {index + 1} cannot be read: {reason}."
        ) from exc


def _mp3_rate(top: int) -> int:
    if top > MP3_RATES[-1] and top % 44_100 == 0:
        return 44_100
    return next((rate for rate in MP3_RATES if rate >= top), MP3_RATES[-1])


def _args(
    paths: Sequence[Source],
    plan: JoinPlan,
    format: ExportFormat,
    tmp: Path,
    *,
    float_wav: bool = False,
) -> list[str]:
    """The join's FFmpeg arguments; ``float_wav``: a 32-bit float WAV, to be measured and
    normalized before it is encoded."""
    args = ["-nostdin", "-hide_banner", "-loglevel", "error"]
    for path in paths:
        # Absolute, so that no name can read as a protocol ("a:b.wav").
        args += ["-f", "wav", "-i", str(_path(path).absolute())]
    args += ["-filter_complex", _graph(plan), "-map", "[out]"]
    if float_wav:
        return [*args, "-c:a", "pcm_f32le", "-f", "wav", "-y", str(tmp.absolute())]
    return [*args, *_output_args(plan, format, tmp)]


def _encode_args(
    mix: Path,
    gain_db: float,
    ceiling_dbtp: float,
    plan: JoinPlan,
    format: ExportFormat,
    tmp: Path,
) -> list[str]:
    """Arguments that encode the float mix with ``gain_db`` under the true-peak limiter."""
    filters = loudness.normalizer(
        gain_db, ceiling_dbtp=ceiling_dbtp, sample_rate=plan.sample_rate, frames=plan.total_frames
    )
    args = ["-nostdin", "-hide_banner", "-loglevel", "error"]
    args += ["-f", "wav", "-i", str(mix.absolute()), "-af", filters]
    return [*args, *_output_args(plan, format, tmp)]


def _output_args(plan: JoinPlan, format: ExportFormat, tmp: Path) -> list[str]:
    if format == "mp3":
        args = ["-c:a", "libmp3lame", "-q:a", str(MP3_QUALITY)]
    elif format == "flac":
        args = ["-c:a", "flac", "-sample_fmt", "s32" if plan.bits == 24 else "s16"]
    else:
        args = ["-c:a", f"pcm_s{plan.bits}le"]
    # bitexact: no encoder-version tags, so the same spine exports to the same bytes.
    args += ["-fflags", "+bitexact", "-flags:a", "+bitexact"]
    return [*args, "-f", format, "-y", str(tmp.absolute())]


def _graph(plan: JoinPlan) -> str:
    k, x = len(plan.segment_frames), plan.crossfade_frames
    layout = "stereo" if plan.channels == 2 else "mono"
    chains = []
    segments = zip(plan.segment_frames, plan.segment_channels, plan.segment_cuts, strict=True)
    for i, (n, channels, cut) in enumerate(segments):
        steps = [f"aresample={plan.sample_rate}"]
        if channels > 2:
            steps.insert(0, _average_to_stereo(channels))
        if cut is not None:
            steps.insert(0, f"atrim=end_sample={cut}")
        elif channels < plan.channels:
            steps.append("pan=stereo|c0=c0|c1=c0")
        steps += [
            f"aformat=sample_fmts=flt:channel_layouts={layout}",
            f"apad=whole_len={n}",
            f"atrim=end_sample={n}",
        ]
        chain = f"[{i}:a]{','.join(steps)}"
        if x == 0 or i == k - 1:
            chains.append(f"{chain}[b{i}]")
        else:
            # The last X frames go to the next join; the rest plays on its own.
            chains += [
                f"{chain},asplit[m{i}][e{i}]",
                f"[m{i}]atrim=end_sample={n - x}[b{i}]",
                f"[e{i}]atrim=start_sample={n - x},asetpts=PTS-STARTPTS[t{i}]",
            ]
        if x and i:
            # Fades the previous tail out and this segment in, then passes it through.
            chains.append(f"[t{i - 1}][b{i}]acrossfade=ns={x}:c1=qsin:c2=qsin[j{i}]")
    pieces = "[b0]" + "".join(f"[{'j' if x else 'b'}{i}]" for i in range(1, k))
    chains.append(f"{pieces}concat=n={k}:v=0:a=1[out]")
    return ";".join(chains)


def _average_to_stereo(channels: int) -> str:
    sides = []
    for side in (0, 1):
        sources = range(side, channels, 2)
        sides.append(f"c{side}=" + "+".join(f"{1 / len(sources):.6g}*c{c}" for c in sources))
    return "pan=stereo|" + "|".join(sides)
