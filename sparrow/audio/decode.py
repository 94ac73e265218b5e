"""Turning an uploaded file into a node's canonical WAV.

``decode_upload(src, dst, …)`` decides everything from the file's content; the
upload's name and Content-Type are never consulted. Outcomes, as the HTTP API
reports them:

- empty file → 422 ``InvalidInput``;
- FFmpeg cannot open it, or finds no audio stream in it → 415
  ``UnsupportedMedia`` when ``sniff()`` does not recognise an audio container,
  422 ``InvalidInput`` ("looks like flac but cannot be decoded: …") when it does;
- FFmpeg recognised the format only with a low score ("misdetection possible")
  and ``sniff()`` does not agree that it is audio → 415. FFmpeg will happily
  call random bytes MP3; such guesses are never accepted;
- a recognised file whose audio stream is unusable (0 channels, no sample
  rate, a rate outside 1 kHz–768 kHz, no decoder, a decode error) → 422.
  Rates that no audio hardware uses (e.g. a header claiming 100 MHz) are
  refused instead of being resampled, so a lying header cannot make us decode
  a huge "duration" of garbage;
- decoded audio longer than ``max_duration_s`` → 413 ``PayloadTooLarge``;
- no samples at all (e.g. a WAV header without data) → 422;
- decoding past ``timeout_s`` (probe and decode together) → 422.

Each of those 415 and 422 answers blames the file only once FFmpeg has shown
that it decodes a known input (``sparrow.audio.canary``): an FFmpeg that fails,
hangs or lies is 503 ``EngineUnavailable`` instead, and a decoded file that
cannot be written (disk full, read-only) is 503 ``StorageUnavailable``.

What is accepted: the first audio stream only, keeping its sample rate and
channel count, except that rates above 192 kHz become 48 kHz and more than
two channels are downmixed to stereo: with FFmpeg's standard matrix when the
layout is known (5.1, 7.1 …), otherwise (a multitrack WAV without positions,
which FFmpeg refuses to downmix) by averaging even channels into the left and
odd ones into the right. Samples are 16-bit, or 24-bit when a lossless codec
carries more than 16 bits (24-bit FLAC, 32-bit float WAV …). Files that decode
partly are accepted with what decodes, as players play them: a truncated MP3
yields its complete frames, and a streaming WAV whose data size reads
0xFFFFFFFF yields the samples actually present. The decoded output of the
same bytes is the same bytes (FFmpeg runs with ``+bitexact``), so ``sha256``
identifies the audio.

FFmpeg runs as a separate process with a wall-clock limit, an address-space
and CPU limit (see ``ffmpeg.run_ffmpeg``), and only container formats that
carry audio: playlist and concat demuxers (hls, dash, concat), image sequences
and other formats that open further files or URLs are refused by FFmpeg's own
``format_whitelist``, and only the ``file`` protocol is allowed. Its output is
bounded with ``-t`` so that a file lying about its length cannot fill the disk.

The result is written to a hidden temporary name next to ``dst``, checked with
Sparrow's own WAV reader (exact frame count from the data chunk size), fsynced
and renamed to ``dst``. On any error, no file is left at ``dst`` or at the
temporary name.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sparrow.audio.atomic import fsync_path, publish, temp_path_for
from sparrow.audio.canary import blame_ffmpeg, require_ffmpeg_not_known_broken
from sparrow.audio.ffmpeg import STDERR_LIMIT, FFmpegResult, FFmpegTimeout, run_ffmpeg
from sparrow.audio.probe import AudioStream, Probe, is_unspecified_layout, parse_probe
from sparrow.audio.sniff import sniff
from sparrow.audio.storage import raise_if_storage_failed, scrub_paths, storing
from sparrow.audio.wav import AudioInfo, WavFormatError, file_sha256, read_layout
from sparrow.errors import (
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMedia,
)

MAX_CHANNELS = 64  # FFmpeg's resampler cannot downmix more
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
MAX_KEPT_RATE = 192_000
RESAMPLED_RATE = 48_000
SNIFF_BYTES = 4096

# Demuxers that carry audio and open nothing but the input itself.
_FORMAT_WHITELIST = (
    "aac,ac3,aiff,amr,amrnb,amrwb,ape,asf,au,avi,caf,dsf,dts,dtshd,eac3,flac,flv,iff,ircam,"
    "loas,matroska,mlp,mov,mp3,mpc,mpc8,mpeg,mpegts,nistsphere,ogg,oma,rm,shn,sox,tak,truehd,"
    "tta,voc,w64,wav,wv,xwma"
)
_LOSSLESS = {"flac", "alac", "wavpack", "tta", "ape", "tak", "mlp", "truehd", "mp4als", "shorten"}
_LOSSY_PCM = {"pcm_alaw", "pcm_mulaw", "pcm_vidc"}
_WIDE_FMTS = {"s32", "s32p", "s64", "s64p", "flt", "fltp", "dbl", "dblp"}
_LOG_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)+")
_GENERIC = re.compile(
    r"^(?:Error opening (?:in|out)put files?|Conversion failed|Task finished with error"
    r"|Terminating thread|Nothing was written|Last message repeated|Error while opening decoder"
    r"|At least one output file|Consider increasing|Guessed Channel Layout"
    r"|Format \S+ detected only with low score)"
)
_REASON_MAX = 120


@dataclass(frozen=True)
class DecodedUpload:
    info: AudioInfo
    source_format: str
    """The container as FFmpeg named it from the content, e.g. ``wav``, ``mp3``,
    ``mov,mp4,m4a,3gp,3g2,mj2``."""
    source_codec: str
    """The audio codec, e.g. ``pcm_s16le``, ``mp3``, ``flac``, ``vorbis``, ``aac``."""


@dataclass(frozen=True)
class _Plan:
    demuxer: str
    bits: int
    downmix: str | None
    """None; ``"ac"`` (``-ac 2``) for known layouts; or a ``pan`` filter."""
    resample: bool


# The plan most files of these kinds get (16-bit, one or two channels, a usual rate),
# with the demuxer FFmpeg names them by. Such a file is decoded by one FFmpeg that also
# describes it (see decode_upload); any other takes a probe first.
_LIKELY = {kind: _Plan(kind, 16, None, False) for kind in ("flac", "mp3", "wav", "ogg")}
# FFmpeg has described its input once it prints how it maps the streams.
_DESCRIBED = re.compile(r"^Stream mapping:", re.M)
# ``-loglevel level+info`` tags every line with its level, after any ``[component @ …]``.
_LEVEL_TAG = re.compile(
    r"^((?:\[[^\]]*\] )*?)\[(trace|debug|verbose|info|warning|error|fatal|panic)\] ", re.M
)
_ERROR_LEVELS = {"error", "fatal", "panic"}


async def decode_upload(
    src: Path, dst: Path, *, max_duration_s: float, timeout_s: float, ffmpeg: str | None = None
) -> DecodedUpload:
    """Decode the upload at ``src`` into a canonical WAV published at ``dst``.

    ``src`` is the raw body on disk (its name is ignored); ``dst`` should end in
    ``.wav`` and its folder must exist. ``timeout_s`` bounds the wall-clock time
    of all FFmpeg runs together; ``ffmpeg`` names the binary (see
    ``ffmpeg.ffmpeg_exe``). Raises ``InvalidInput`` (422),
    ``UnsupportedMedia`` (415) or ``PayloadTooLarge`` (413) for bad input, as
    listed in the module docstring.

    A file whose bytes look like one of the usual kinds (``_LIKELY``) is decoded at
    once with that kind's usual plan, by an FFmpeg that describes the input before it
    decodes, as a probe would. The description decides, as a probe's does: FFmpeg is
    stopped as soon as it calls for another plan (a 24-bit FLAC, a 5.1 WAV), and the
    file is decoded again with that one. Either way the arguments of the decode that is
    kept are the plan's, so the same file gives the same bytes.
    """
    size, head = await asyncio.to_thread(_head, src)
    if size == 0:
        raise InvalidInput("The uploaded file is empty.")
    kind = sniff(head, complete=size <= len(head))
    require_ffmpeg_not_known_broken(ffmpeg, "The upload cannot be decoded")
    deadline = asyncio.get_running_loop().time() + timeout_s
    tmp = temp_path_for(dst)
    guess = _LIKELY.get(kind or "")
    try:
        try:
            run: FFmpegResult | None = None
            if guess is None:
                probe_run = await run_ffmpeg(_probe_args(src), deadline=deadline, ffmpeg=ffmpeg)
                described = probe_run.stderr
            else:
                run = await run_ffmpeg(
                    _decode_args(src, tmp, guess, max_duration_s, describe=True),
                    deadline=deadline,
                    ffmpeg=ffmpeg,
                    stop_when=_OtherPlan(kind, guess),
                )
                described, errors = _split_levels(run.stderr)
            probe = parse_probe(described)
            stream, plan = _plan(probe, kind, described)
            if run is None or run.stopped or plan != guess:
                _discard(tmp)
                args = _decode_args(src, tmp, plan, max_duration_s)
                run = await run_ffmpeg(args, deadline=deadline, ffmpeg=ffmpeg)
                errors = run.stderr
            if run.returncode != 0:
                raise_if_storage_failed(errors, "the decoded audio")
                raise _cannot_decode(kind, probe, _short_reason(errors))
            info = await _finish_in_thread(tmp, dst, probe, kind, max_duration_s)
        except BaseException:
            _discard(tmp)
            raise
    except FFmpegTimeout:
        await blame_ffmpeg(ffmpeg, "The upload cannot be decoded")
        raise InvalidInput(
            f"Decoding took longer than {timeout_s:g} s; the file may be damaged."
        ) from None
    except (InvalidInput, UnsupportedMedia):
        # The file's fault only if FFmpeg can decode anything at all.
        await blame_ffmpeg(ffmpeg, "The upload cannot be decoded")
        raise
    assert probe.format is not None
    return DecodedUpload(info=info, source_format=probe.format, source_codec=stream.codec)


class _OtherPlan:
    """Reads the stderr of a decode started on ``guess`` until FFmpeg has described the
    input; says stop when that description calls for another plan (or for an error)."""

    def __init__(self, kind: str | None, guess: _Plan) -> None:
        self.kind = kind
        self.guess = guess
        self.head = bytearray()
        self.decided = False

    def __call__(self, chunk: bytes) -> bool:
        if self.decided:
            return False
        self.head += chunk
        described, _ = _split_levels(self.head.decode("utf-8", errors="replace"))
        if not _DESCRIBED.search(described):
            # No description within what run_ffmpeg keeps: the result is judged at the end.
            self.decided = len(self.head) >= STDERR_LIMIT
            return False
        self.decided = True
        try:
            _, plan = _plan(parse_probe(described), self.kind, described)
        except (InvalidInput, UnsupportedMedia):
            return True
        return plan != self.guess


def _split_levels(stderr: str) -> tuple[str, str]:
    """The stderr of ``-loglevel level+info`` as (every line, only the errors), each
    without its level tag: what ``-loglevel info`` and ``-loglevel error`` would print."""
    every, errors = [], []
    for line in stderr.splitlines(keepends=True):
        tagged = _LEVEL_TAG.match(line)
        if tagged is None:  # the rest of a line FFmpeg printed in pieces
            every.append(line)
            continue
        untagged = tagged.group(1) + line[tagged.end() :]
        every.append(untagged)
        if tagged.group(2) in _ERROR_LEVELS:
            errors.append(untagged)
    return "".join(every), "".join(errors)


def _head(src: Path) -> tuple[int, bytes]:
    with src.open("rb") as f:
        return src.stat().st_size, f.read(SNIFF_BYTES)


def _probe_args(src: Path) -> list[str]:
    return [
        "-hide_banner", "-nostdin",
        # Audio gains nothing from decoder threads, and on a many-core host
        # their stacks alone would approach the address-space limit.
        "-threads", "1",
        "-protocol_whitelist", "file",
        "-format_whitelist", _FORMAT_WHITELIST,
        "-i", f"file:{src.resolve()}",
    ]  # fmt: skip


def _decode_args(
    src: Path, tmp: Path, plan: _Plan, max_duration_s: float, *, describe: bool = False
) -> list[str]:
    """FFmpeg's arguments for decoding with ``plan``. With ``describe`` it finds the
    demuxer itself and describes the input first (``-loglevel level+info``), as a probe
    does; otherwise it opens the input with the plan's demuxer and prints only errors."""
    args = [
        "-hide_banner", "-nostdin", "-nostats",
        "-loglevel", "level+info" if describe else "error",
        "-threads", "1", "-filter_threads", "1",
        "-protocol_whitelist", "file",
        "-format_whitelist", _FORMAT_WHITELIST,
        *([] if describe else ["-f", plan.demuxer]),
        "-i", f"file:{src.resolve()}",
        "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-map_metadata", "-1", "-map_chapters", "-1",
        "-c:a", "pcm_s24le" if plan.bits == 24 else "pcm_s16le",
        # One second of slack so that "too long" is detected, never silently cut.
        "-t", f"{max_duration_s + 1:.3f}",
        # No encoder tag or LIST chunk: the same input gives the same bytes.
        "-fflags", "+bitexact", "-flags:a", "+bitexact",
    ]  # fmt: skip
    if plan.downmix == "ac":
        args += ["-ac", "2"]
    elif plan.downmix:
        args += ["-af", plan.downmix]
    if plan.resample:
        args += ["-ar", str(RESAMPLED_RATE)]
    return [*args, "-f", "wav", "-y", f"file:{tmp.resolve()}"]


def _plan(probe: Probe, kind: str | None, stderr: str) -> tuple[AudioStream, _Plan]:
    """Decide how to decode, or raise the error this probe calls for."""
    if probe.format is None or probe.audio is None:
        if kind is None:
            raise _not_audio()
        reason = "it has no audio stream" if probe.format else _short_reason(stderr)
        raise _cannot_decode(kind, probe, reason)
    if probe.low_score and kind is None:
        # FFmpeg's own words: "misdetection possible". Arbitrary bytes end up here.
        raise _not_audio()
    stream = probe.audio
    if stream.channels == 0:
        raise _cannot_decode(kind, probe, "it declares no audio channels")
    if stream.channels is not None and stream.channels > MAX_CHANNELS:
        raise _cannot_decode(
            kind,
            probe,
            f"it declares {stream.channels} channels; at most {MAX_CHANNELS} are supported",
        )
    if stream.sample_rate is None:
        raise _cannot_decode(kind, probe, "it declares no sample rate")
    if not MIN_SAMPLE_RATE <= stream.sample_rate <= MAX_SAMPLE_RATE:
        raise _cannot_decode(
            kind,
            probe,
            f"its sample rate of {stream.sample_rate} Hz is outside "
            f"{MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz",
        )
    if stream.sample_fmt is None or stream.codec == "none":
        raise _cannot_decode(kind, probe, f"FFmpeg cannot decode its {stream.codec} audio")
    plan = _Plan(
        demuxer=probe.format.split(",")[0],
        bits=24 if _is_high_resolution(stream) else 16,
        downmix=_downmix(stream),
        resample=stream.sample_rate > MAX_KEPT_RATE,
    )
    return stream, plan


def _downmix(stream: AudioStream) -> str | None:
    if stream.channels is not None and stream.channels <= 2:
        return None
    if stream.channels is None or not is_unspecified_layout(stream.layout):
        return "ac"  # FFmpeg knows the positions and applies the standard downmix
    # Positions unknown (e.g. a multitrack WAV): FFmpeg refuses to guess, so even
    # channels go left and odd ones right, averaged, and no track is lost.
    sides = []
    for side in (0, 1):
        sources = range(side, stream.channels, 2)
        gain = 1 / len(sources)
        sides.append(f"c{side}=" + "+".join(f"{gain:.6g}*c{c}" for c in sources))
    return "pan=stereo|" + "|".join(sides)


def _is_high_resolution(stream: AudioStream) -> bool:
    """A lossless codec carrying more than 16 bits per sample."""
    codec = stream.codec
    lossless = (
        codec in _LOSSLESS
        or codec.startswith("dsd_")
        or (codec.startswith("pcm_") and codec not in _LOSSY_PCM)
    )
    if not lossless:
        return False
    if stream.bits is not None:
        return stream.bits > 16
    return stream.sample_fmt in _WIDE_FMTS


async def _finish_in_thread(
    tmp: Path, dst: Path, probe: Probe, kind: str | None, max_duration_s: float
) -> AudioInfo:
    """Check and publish the decoded file off the event loop (it hashes the whole file)."""
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(None, _finish, tmp, dst, probe, kind, max_duration_s)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        # A thread cannot be interrupted: let it end, then undo what it published.
        await asyncio.wait([work])
        if not work.cancelled() and work.exception() is None:
            _discard(dst)
        raise


def _finish(
    tmp: Path, dst: Path, probe: Probe, kind: str | None, max_duration_s: float
) -> AudioInfo:
    try:
        layout = read_layout(tmp)
    except (WavFormatError, FileNotFoundError) as exc:
        raise _cannot_decode(kind, probe, "FFmpeg produced no usable audio") from exc
    if layout.frames == 0:
        raise InvalidInput("The file contains no audio samples.")
    duration_s = layout.frames / layout.sample_rate
    if duration_s > max_duration_s:
        raise PayloadTooLarge(_too_long(duration_s, probe.duration_s, max_duration_s))
    with ThreadPoolExecutor(1, thread_name_prefix="sparrow-fsync") as disk:
        # The disk takes the file in while the hash reads it from the page cache; the
        # fsync in ``publish`` then finds nothing left to write (0.1 ms).
        flushed = disk.submit(fsync_path, tmp)
        sha256 = file_sha256(tmp)
        with storing("saving the decoded audio"):
            flushed.result()
            publish(tmp, dst)
    return AudioInfo(
        sample_rate=layout.sample_rate,
        channels=layout.channels,
        frames=layout.frames,
        bits=layout.bits,
        sha256=sha256,
    )


def _discard(path: Path) -> None:
    # Cleanup on an error path: one unlink, too quick to be worth a thread.
    path.unlink(missing_ok=True)


def _too_long(decoded_s: float, probed_s: float | None, limit_s: float) -> str:
    # Decoding stops one second past the limit, so the container's own duration,
    # when it is longer, is the better number to show.
    if probed_s is not None and probed_s >= decoded_s:
        return f"The audio is {probed_s:.1f} s long; the limit is {limit_s:g} s."
    if decoded_s >= limit_s + 1 - 0.01:
        return f"The audio is at least {limit_s + 1:g} s long; the limit is {limit_s:g} s."
    return f"The audio is {decoded_s:.1f} s long; the limit is {limit_s:g} s."


def _not_audio() -> UnsupportedMedia:
    return UnsupportedMedia("The file is not an audio file FFmpeg can read.")


def _cannot_decode(kind: str | None, probe: Probe, reason: str) -> InvalidInput:
    name = kind or (probe.format.split(",")[0] if probe.format else "audio")
    return InvalidInput(f"The file looks like {name} but cannot be decoded: {reason}.")


def _short_reason(stderr: str) -> str:
    """The most telling line of FFmpeg's error output, without its ``[demuxer @ 0x…]`` tags."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    specific = [line for line in lines if not _GENERIC.match(line)]
    chosen = (specific or lines or ["FFmpeg reported no reason"])[0]
    if chosen.startswith("Format not on whitelist"):
        return "its container format is not one Sparrow accepts"
    chosen = chosen.removeprefix("Error opening input: ").rstrip(".!")
    if len(chosen) > _REASON_MAX:
        chosen = chosen[: _REASON_MAX - 1] + "…"
    if chosen[:1].isupper() and chosen[1:2].islower():
        chosen = chosen[:1].lower() + chosen[1:]
    return scrub_paths(chosen)
