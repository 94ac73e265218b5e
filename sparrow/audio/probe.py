"""Read what ``ffmpeg -i FILE`` says about a file.

There is no ffprobe next to the bundled FFmpeg, so probing runs
``ffmpeg -hide_banner -nostdin -i FILE`` (no output: it exits non-zero after
printing the input description) and parses its stderr:

    Input #0, wav, from 'file:/…':
      Duration: 00:00:02.00, bitrate: 1411 kb/s
      Stream #0:0: Audio: pcm_s24le (…), 48000 Hz, stereo, s32 (24 bit), 2304 kb/s

Only lines with FFmpeg's own fixed indentation are read, and metadata values
are printed by FFmpeg behind a ``key : `` prefix on every line, so tags inside
the file cannot forge a stream line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INPUT = re.compile(r"^Input #0, (?P<format>[^\s,][^\n]*?), from '", re.M)
_DURATION = re.compile(r"^  Duration: (?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d(?:\.\d+)?)", re.M)
_AUDIO = re.compile(r"^(?:  |    )Stream #0:\d+\S*: Audio: (?P<desc>[^\n]*)$", re.M)
_LOW_SCORE = re.compile(r"detected only with low score of \d+, misdetection possible")
_RATE = re.compile(r"^(\d+) Hz$")
_CHANNELS = re.compile(r"^(\d+) channels\b")
# The last field may carry disposition flags: "fltp (default)", "s16 (default) (forced)".
_SAMPLE_FMT = re.compile(
    r"^(?P<fmt>(?:u8|s16|s32|s64|flt|dbl)p?)(?: \((?P<bits>\d+) bit\))?(?: \([a-z_ ]+\))*$"
)

# FFmpeg's named layouts (``ffmpeg -layouts``) and their channel counts.
_LAYOUTS = {
    "mono": 1, "stereo": 2, "binaural": 2, "downmix": 2,
    "2.1": 3, "3.0": 3, "3.0(back)": 3,
    "4.0": 4, "quad": 4, "quad(side)": 4, "3.1": 4,
    "5.0": 5, "5.0(side)": 5, "4.1": 5,
    "5.1": 6, "5.1(side)": 6, "6.0": 6, "6.0(front)": 6, "3.1.2": 6, "hexagonal": 6,
    "6.1": 7, "6.1(back)": 7, "6.1(front)": 7, "7.0": 7, "7.0(front)": 7,
    "7.1": 8, "7.1(wide)": 8, "7.1(wide-side)": 8, "5.1.2": 8, "5.1.2(back)": 8,
    "octagonal": 8, "cube": 8,
    "5.1.4": 10, "7.1.2": 10, "7.1.4": 12, "7.2.3": 12, "9.1.4": 14,
    "9.1.6": 16, "hexadecagonal": 16, "22.2": 24,
}  # fmt: skip


@dataclass(frozen=True)
class AudioStream:
    """The first audio stream as FFmpeg describes it (``None`` where it printed nothing)."""

    codec: str
    sample_rate: int | None
    channels: int | None
    layout: str | None
    """FFmpeg's layout name: ``stereo``, ``5.1(side)``, ``FL+FR+LFE``, or ``9 channels``
    when the file says how many channels but not which."""
    sample_fmt: str | None
    bits: int | None
    """Bits per raw sample when FFmpeg prints ``(NN bit)``, e.g. 24 for s32 (24 bit)."""


@dataclass(frozen=True)
class Probe:
    format: str | None
    """Demuxer name, e.g. ``wav`` or ``mov,mp4,m4a,3gp,3g2,mj2``; None if FFmpeg cannot open it."""
    low_score: bool
    """FFmpeg guessed the format with a low score and warned about misdetection."""
    duration_s: float | None
    audio: AudioStream | None


def parse_probe(stderr: str) -> Probe:
    """Parse the stderr of ``ffmpeg -i FILE`` (see the module docstring)."""
    fmt = _INPUT.search(stderr)
    duration = _DURATION.search(stderr)
    audio = _AUDIO.search(stderr)
    return Probe(
        format=fmt.group("format") if fmt else None,
        low_score=bool(_LOW_SCORE.search(stderr)),
        duration_s=_seconds(duration) if duration else None,
        audio=_parse_audio(audio.group("desc")) if fmt and audio else None,
    )


def _seconds(match: re.Match[str]) -> float:
    return int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])


def _parse_audio(desc: str) -> AudioStream:
    fields = _split_top_level(desc)
    codec = fields[0].split(" ", 1)[0] if fields else "unknown"
    rate: int | None = None
    channels: int | None = None
    layout: str | None = None
    sample_fmt: str | None = None
    bits: int | None = None
    for i, field in enumerate(fields[1:], start=1):
        if rate is None and (m := _RATE.match(field)):
            rate = int(m.group(1))
            # The layout follows the rate; FFmpeg omits it when it knows no channels.
            if i + 1 < len(fields):
                layout = fields[i + 1]
                channels = _channel_count(layout)
        elif sample_fmt is None and (m := _SAMPLE_FMT.match(field)):
            sample_fmt = m.group("fmt")
            bits = int(m.group("bits")) if m.group("bits") else None
    return AudioStream(codec, rate, channels, layout, sample_fmt, bits)


def is_unspecified_layout(layout: str | None) -> bool:
    """True for ``N channels``: a count without channel positions."""
    return layout is not None and re.fullmatch(r"\d+ channels", layout) is not None


def _channel_count(layout: str) -> int | None:
    if layout in _LAYOUTS:
        return _LAYOUTS[layout]
    if m := _CHANNELS.match(layout):
        return int(m.group(1))
    # Custom layouts print as channel names joined by "+", e.g. "FL+FR+LFE".
    if re.fullmatch(r"[A-Z][A-Za-z0-9]*(?:\+[A-Z][A-Za-z0-9]*)*", layout):
        return layout.count("+") + 1
    return None


def _split_top_level(desc: str) -> list[str]:
    """Split on ", " outside parentheses: codec descriptions contain commas in parens."""
    fields: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(desc):
        ch = desc[i]
        if ch in "([":
            depth += 1
        elif ch in ")]" and depth:
            depth -= 1
        elif ch == "," and depth == 0:
            fields.append(desc[start:i].strip())
            start = i + 1
        i += 1
    fields.append(desc[start:].strip())
    return [f for f in fields if f]
