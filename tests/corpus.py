"""Upload test files, built on demand with numpy and the FFmpeg binary.

No binary fixtures are committed: ``make_good_uploads`` and
``make_bad_uploads`` write the files into a folder and describe what Sparrow
must make of each one. The expectations are stated as the HTTP API reports
them (``status`` 201 for accepted, otherwise the error's status and ``code``),
so that the decoder's unit tests and the upload endpoint's tests can iterate
over the same cases.

Every file is named with a misleading or meaningless extension on purpose:
Sparrow must decide from the content alone.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sparrow.audio import ffmpeg_exe, render_music, write_wav

SECONDS = 1.5

# The case names, for parametrising tests before the files exist.
GOOD_NAMES = (
    "wav_s16_44k_stereo", "wav_s24_48k_mono", "wav_f32", "wav_u8_22k_mono", "wav_5_1",
    "wav_384k", "mp3", "mp3_named_flac", "flac_16", "flac_24", "ogg_vorbis", "ogg_opus",
    "m4a_aac", "aac_adts", "aiff", "webm_opus_default", "mka_two_streams",
)  # fmt: skip
BAD_NAMES = (
    "empty", "one_byte", "random_0_1", "random_1_100", "random_2_4096", "random_3_100000",
    "random_4_7", "random_5_65536", "png_named_wav", "text_file", "html_file",
    "flac_magic_then_garbage", "wav_channels_0", "wav_rate_0", "wav_channels_65535",
    "wav_header_only", "wav_rate_100mhz", "wav_rate_1hz", "wav_datasize_ffffffff",
    "over_duration", "truncated_mp3", "mp4_video_only", "hls_playlist", "ffconcat_list",
    "wav_two_fmt", "wav_data_before_fmt", "wav_two_data", "wav_riff_size_small",
    "wav_fmt_size_huge", "wav_block_align_0", "wav_bits_0", "wav_bits_64", "wav_codec_ffff",
    "wav_data_size_50x", "wav_junk_size_2gb", "rf64_without_ds64", "id3_size_256mb",
    "flac_rate_0",
)  # fmt: skip


@dataclass(frozen=True)
class GoodUpload:
    """A file Sparrow must accept (HTTP 201), and the canonical WAV it must produce."""

    name: str
    path: Path
    sample_rate: int
    channels: int
    """After canonicalisation: more than two channels are downmixed to stereo."""
    bits: int
    codec: str
    """``source_codec`` as FFmpeg names it."""
    duration_s: float
    tolerance_s: float
    """Lossy codecs add encoder delay/padding that not every container trims."""
    frames: int | None = None
    """Exact frame count where the codec is sample-exact (PCM, FLAC, AIFF)."""
    status: int = 201


@dataclass(frozen=True)
class BadUpload:
    """A file and what the upload endpoint must answer for it."""

    name: str
    path: Path
    status: int
    """201 where the documented decision is to accept it; otherwise the error status."""
    code: str | None
    """The error code in the JSON body; None when accepted."""
    why: str
    max_duration_s: float | None = None
    """Upload duration limit the case needs (None: the default limit)."""


def ffmpeg(*args: str) -> None:
    """Run the FFmpeg binary quietly; raise if it fails."""
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def music(
    seconds: float, sample_rate: int, channels: int, seed: int = 1
) -> npt.NDArray[np.float32]:
    return render_music(seconds, sample_rate, channels, seed)


def make_good_uploads(dirpath: Path) -> dict[str, GoodUpload]:
    """Write one file per supported format into ``dirpath``; keyed by case name."""
    dirpath.mkdir(parents=True, exist_ok=True)
    src = dirpath / "source-44k-stereo.wav"
    write_wav(src, music(SECONDS, 44100, 2), 44100)
    cases: list[GoodUpload] = []

    def encode(name: str, suffix: str, *options: str, source: Path = src) -> Path:
        path = dirpath / f"{name}{suffix}"
        ffmpeg("-i", str(source), *options, str(path))
        return path

    def add(
        name: str,
        path: Path,
        rate: int,
        channels: int,
        bits: int,
        codec: str,
        *,
        tolerance_s: float = 0.0,
        exact: bool = True,
    ) -> None:
        frames = round(SECONDS * rate) if exact else None
        cases.append(
            GoodUpload(name, path, rate, channels, bits, codec, SECONDS, tolerance_s, frames)
        )

    path = dirpath / "wav_s16_44k_stereo.bin"
    shutil.copyfile(src, path)
    add("wav_s16_44k_stereo", path, 44100, 2, 16, "pcm_s16le")

    path = dirpath / "wav_s24_48k_mono.upload"
    write_wav(path, music(SECONDS, 48000, 1), 48000, bits=24)
    add("wav_s24_48k_mono", path, 48000, 1, 24, "pcm_s24le")

    path = encode("wav_f32", ".mp3", "-c:a", "pcm_f32le", "-f", "wav")
    add("wav_f32", path, 44100, 2, 24, "pcm_f32le")

    path = encode("wav_u8_22k_mono", "", "-c:a", "pcm_u8", "-ar", "22050", "-ac", "1", "-f", "wav")
    add("wav_u8_22k_mono", path, 22050, 1, 16, "pcm_u8")

    six = "pan=5.1|FL=c0|FR=c1|FC=0.5*c0+0.5*c1|LFE=0.2*c0|BL=0.7*c0|BR=0.7*c1"
    path = encode("wav_5_1", ".wav", "-af", six, "-c:a", "pcm_s16le", "-f", "wav")
    add("wav_5_1", path, 44100, 2, 16, "pcm_s16le")  # downmixed to stereo

    path = encode("wav_384k", ".wav", "-ar", "384000", "-c:a", "pcm_s16le", "-f", "wav")
    add("wav_384k", path, 48000, 2, 16, "pcm_s16le", tolerance_s=0.002, exact=False)

    mp3 = encode("mp3", ".ogg", "-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3")
    add("mp3", mp3, 44100, 2, 16, "mp3", tolerance_s=0.06, exact=False)

    path = dirpath / "mp3_named_flac.flac"
    shutil.copyfile(mp3, path)
    add("mp3_named_flac", path, 44100, 2, 16, "mp3", tolerance_s=0.06, exact=False)

    path = encode("flac_16", ".wav", "-c:a", "flac", "-f", "flac")
    add("flac_16", path, 44100, 2, 16, "flac")

    hi_res = dirpath / "source-96k-24bit.wav"
    write_wav(hi_res, music(SECONDS, 96000, 2, seed=2), 96000, bits=24)
    path = encode("flac_24", "", "-c:a", "flac", "-sample_fmt", "s32", "-f", "flac", source=hi_res)
    add("flac_24", path, 96000, 2, 24, "flac")

    path = encode("ogg_vorbis", ".wav", "-c:a", "libvorbis", "-q:a", "3", "-f", "ogg")
    add("ogg_vorbis", path, 44100, 2, 16, "vorbis", tolerance_s=0.06, exact=False)

    path = encode("ogg_opus", ".mp3", "-c:a", "libopus", "-b:a", "64k", "-f", "ogg")
    add("ogg_opus", path, 48000, 2, 16, "opus", tolerance_s=0.06, exact=False)

    path = encode("m4a_aac", "", "-c:a", "aac", "-b:a", "128k", "-f", "mp4")
    add("m4a_aac", path, 44100, 2, 16, "aac", tolerance_s=0.06, exact=False)

    # Raw ADTS has no edit list, so the encoder's priming samples stay in.
    path = encode("aac_adts", ".m4a", "-c:a", "aac", "-b:a", "128k", "-f", "adts")
    add("aac_adts", path, 44100, 2, 16, "aac", tolerance_s=0.1, exact=False)

    path = encode("aiff", ".wav", "-ar", "22050", "-ac", "1", "-c:a", "pcm_s16be", "-f", "aiff")
    add("aiff", path, 22050, 1, 16, "pcm_s16be")

    # What browsers' MediaRecorder writes: FFmpeg prints "fltp (default)" for it.
    path = encode("webm_opus_default", "", "-c:a", "libopus", "-disposition:a:0", "default",
                  "-f", "webm")  # fmt: skip
    add("webm_opus_default", path, 48000, 2, 16, "opus", tolerance_s=0.06, exact=False)

    path = dirpath / "mka_two_streams"
    ffmpeg("-i", str(src), "-i", str(hi_res), "-map", "0:a", "-map", "1:a", "-c:a", "flac",
           "-f", "matroska", str(path))  # fmt: skip
    add("mka_two_streams", path, 44100, 2, 16, "flac")  # the first audio stream is used

    assert tuple(case.name for case in cases) == GOOD_NAMES
    return {case.name: case for case in cases}


def make_bad_uploads(dirpath: Path) -> list[BadUpload]:
    """Write the hostile and broken cases into ``dirpath``."""
    dirpath.mkdir(parents=True, exist_ok=True)
    cases: list[BadUpload] = []

    def add(
        name: str,
        data: bytes,
        status: int,
        why: str,
        *,
        suffix: str = "",
        max_duration_s: float | None = None,
    ) -> None:
        path = dirpath / f"{name}{suffix}"
        path.write_bytes(data)
        code = {201: None, 413: "payload_too_large", 415: "unsupported_media"}.get(
            status, "invalid_input"
        )
        cases.append(BadUpload(name, path, status, code, why, max_duration_s))

    pcm = _pcm16(music(1.0, 44100, 2))
    add("empty", b"", 422, "nothing was uploaded")
    add("one_byte", b"\x00", 415, "one byte is no audio container")
    for seed, size in ((0, 1), (1, 100), (2, 4096), (3, 100_000), (4, 7), (5, 65_536)):
        data = np.random.default_rng(seed).bytes(size)
        add(
            f"random_{seed}_{size}",
            data,
            415,
            "random bytes, whatever FFmpeg guesses",
            suffix=".mp3",
        )
    add("png_named_wav", _tiny_png(), 415, "an image under an audio name", suffix=".wav")
    add("text_file", b"Not audio at all.\n" * 200, 415, "plain text", suffix=".flac")
    add("html_file", b"<!doctype html><html><body>hi</body></html>\n", 415, "HTML", suffix=".ogg")
    add("flac_magic_then_garbage", b"fLaC" + np.random.default_rng(9).bytes(3000), 422,
        "looks like FLAC, does not decode")  # fmt: skip
    add("wav_channels_0", _wav(pcm, channels=0, block_align=4), 422, "0 channels in the header")
    add("wav_rate_0", _wav(pcm, rate=0), 422, "0 Hz in the header")
    add("wav_channels_65535", _wav(pcm, channels=65535), 422, "65535 channels in the header")
    add("wav_header_only", _wav(b""), 422, "a WAV header with no samples")
    add("wav_rate_100mhz", _wav(pcm, channels=1, rate=100_000_000), 422,
        "a 100 MHz sample rate is refused, not resampled")  # fmt: skip
    add("wav_rate_1hz", _wav(pcm[:2000], channels=1, rate=1), 422,
        "a 1 Hz sample rate would make 1000 samples last 17 minutes")  # fmt: skip
    add("wav_datasize_ffffffff", _wav(pcm, data_size=0xFFFFFFFF), 201,
        "a streaming WAV header: accepted with the samples actually present")  # fmt: skip
    add("over_duration", _wav(_pcm16(music(3.0, 8000, 1)), channels=1, rate=8000), 413,
        "3 s of audio against a 2 s limit", max_duration_s=2.0)  # fmt: skip

    mp3 = dirpath / "whole.mp3"
    _encode_mp3(pcm, mp3)
    whole = mp3.read_bytes()
    add("truncated_mp3", whole[: len(whole) * 3 // 5 + 17], 201,
        "an MP3 cut mid-frame: players play what is there, so it is accepted")  # fmt: skip

    video = dirpath / "video_only.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=5:duration=0.4", "-c:v", "mpeg4",
           "-f", "mp4", str(video))  # fmt: skip
    add("mp4_video_only", video.read_bytes(), 422, "an MP4 without an audio stream")
    video.unlink()

    # Formats that make FFmpeg open other files: refused, they could leak server files.
    target = dirpath / "secret.wav"
    write_wav(target, music(0.5, 8000, 1), 8000)
    playlist = (
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:1.0,\nfile:{target}\n#EXT-X-ENDLIST\n"
    )
    add("hls_playlist", playlist.encode(), 415, "an HLS playlist pointing at a server file")
    add("ffconcat_list", f"ffconcat version 1.0\nfile '{target}'\n".encode(), 415,
        "an FFmpeg concat list pointing at a server file")  # fmt: skip

    # Lying sizes and conflicting chunks: one consistent reading, or a 422 — never a crash.
    fmt = _chunk(b"fmt ", _fmt(2, 44100))
    add("wav_two_fmt", _riff(fmt, _chunk(b"fmt ", _fmt(1, 8000)), _chunk(b"data", pcm)), 201,
        "two conflicting fmt chunks: the first one is read")  # fmt: skip
    add("wav_data_before_fmt", _riff(_chunk(b"data", pcm), fmt), 201,
        "the data chunk before the fmt chunk")  # fmt: skip
    add("wav_two_data", _riff(fmt, _chunk(b"data", pcm), _chunk(b"data", pcm[:1000])), 201,
        "two data chunks: FFmpeg reads one of them")  # fmt: skip
    add("wav_riff_size_small", _riff(fmt, _chunk(b"data", pcm), size=100), 201,
        "a RIFF size smaller than the file: the chunks present are read")  # fmt: skip
    add("wav_fmt_size_huge", _riff(_chunk(b"fmt ", _fmt(2, 44100), size=0xFFFFFFF0),
        _chunk(b"data", pcm)), 422, "a fmt chunk that claims 4 GiB")  # fmt: skip
    add("wav_block_align_0", _riff(_chunk(b"fmt ", _fmt(2, 44100, align=0)),
        _chunk(b"data", pcm)), 201, "block align 0: computed from channels and bits")  # fmt: skip
    add("wav_bits_0", _riff(_chunk(b"fmt ", _fmt(2, 44100, bits=0)), _chunk(b"data", pcm)),
        422, "0 bits per sample")  # fmt: skip
    add("wav_bits_64", _riff(_chunk(b"fmt ", _fmt(2, 44100, bits=64)), _chunk(b"data", pcm)),
        201, "64-bit integer PCM: the same bytes read as a quarter of the frames")  # fmt: skip
    add("wav_codec_ffff", _riff(_chunk(b"fmt ", _fmt(2, 44100, tag=0xFFFF)),
        _chunk(b"data", pcm)), 422, "an unknown codec tag")  # fmt: skip
    add("wav_data_size_50x", _riff(fmt, _chunk(b"data", pcm, size=len(pcm) * 50)), 201,
        "a data size 50 times the bytes present: the bytes present are read")  # fmt: skip
    add("wav_junk_size_2gb", _riff(fmt, _chunk(b"JUNK", b"", size=0x7FFFFFFF),
        _chunk(b"data", pcm)), 422, "a JUNK chunk claiming 2 GiB hides the data")  # fmt: skip
    add("rf64_without_ds64", b"RF64\xff\xff\xff\xffWAVE" + fmt + _chunk(b"data", pcm), 422,
        "an RF64 header without its ds64 sizes")  # fmt: skip
    add("id3_size_256mb", b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f" + bytes(100), 422,
        "an ID3 tag claiming 256 MiB, then nothing")  # fmt: skip
    streaminfo = b"\x10\x00\x10\x00" + bytes(6) + b"\x00\x00\x01\x70" + bytes(20)
    add("flac_rate_0", b"fLaC\x80\x00\x00\x22" + streaminfo, 422,
        "a FLAC STREAMINFO with a 0 Hz rate")  # fmt: skip
    assert tuple(case.name for case in cases) == BAD_NAMES
    return cases


def _encode_mp3(pcm: bytes, dst: Path) -> None:
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "s16le", "-ar", "44100", "-ac", "2", "-i", "pipe:0",
         "-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3", str(dst)],
        input=pcm, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _pcm16(samples: npt.NDArray[np.float32]) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _wav(
    data: bytes,
    *,
    channels: int = 2,
    rate: int = 44100,
    bits: int = 16,
    block_align: int | None = None,
    data_size: int | None = None,
) -> bytes:
    """A plain PCM WAV whose header fields can be set to any (wrong) value."""
    fmt = _chunk(b"fmt ", _fmt(channels, rate, bits=bits, align=block_align))
    riff_size = 0xFFFFFFFF if data_size is not None else None  # a streaming header
    return _riff(fmt, _chunk(b"data", data, size=data_size), size=riff_size)


def _chunk(kind: bytes, payload: bytes, *, size: int | None = None) -> bytes:
    """A RIFF chunk whose size field may lie."""
    pad = b"\0" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload) if size is None else size) + payload + pad


def _fmt(
    channels: int, rate: int, *, bits: int = 16, align: int | None = None, tag: int = 1
) -> bytes:
    align = channels * bits // 8 if align is None else align
    byte_rate = rate * align & 0xFFFFFFFF
    return struct.pack("<HHIIHH", tag, channels, rate, byte_rate, align & 0xFFFF, bits)


def _riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def _tiny_png() -> bytes:
    """A valid 2×2 RGB PNG."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes([255, 0, 0, 0, 255, 0]) for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
