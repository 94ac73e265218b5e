"""Recognise an audio container from the first bytes of a file.

``sniff(head)`` never looks at a file name or a Content-Type: only at magic
numbers. It answers a short container name, or ``None`` when the bytes do not
start like any audio file it knows. Decoding always goes through FFmpeg; the
answer is used to word errors (a file that *looks like* FLAC but does not
decode is a 422, a file that is not audio at all is a 415) and to refuse
FFmpeg's low-confidence guesses on arbitrary bytes.

Give it at least the first 64 bytes; more (a few KiB) lets it check that an
MPEG or ADTS frame header is followed by a second frame, which keeps random
bytes that happen to start with a frame sync (about 1 in 5,000 do) from being
taken for MP3/AAC. When the bytes are the whole file, say so with
``complete=True``: a file too short to hold a frame and the next header is
then not taken for MP3/AAC either (FFmpeg itself needs two frames).
"""

from __future__ import annotations

from collections.abc import Callable

_W64_RIFF_GUID = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_ASF_GUID = b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c"
_EBML = b"\x1a\x45\xdf\xa3"
_QUICKTIME_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
# ISO media files that are still images, not audio/video.
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1")

# MPEG audio header tables, indexed [version][layer][bitrate_index] in kbit/s.
_V1 = {
    1: (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    2: (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
}
_V2 = {
    1: (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    3: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_RATES = 13  # sampling_frequency_index 0..12 are defined


def sniff(head: bytes, *, complete: bool = False) -> str | None:
    """Container name for these leading bytes, or ``None`` if not recognised.

    Names: ``wav`` (RIFF/RIFX/RF64/BW64 WAVE), ``w64``, ``aiff`` (AIFF/AIFC),
    ``flac``, ``ogg``, ``mp3`` (ID3 tag or MPEG audio frame), ``aac`` (ADTS),
    ``mp4`` (ISO/QuickTime boxes), ``caf``, ``webm``, ``matroska``, ``au``,
    ``amr``, ``ac3``, ``dts``, ``wavpack``, ``tta``, ``ape``, ``mpc``,
    ``voc``, ``dsf``, ``dff``, ``asf``.
    """
    for name, test in _MAGIC:
        if test(head):
            return name
    if _is_mpeg_audio(head, complete):
        return "mp3"
    if _is_adts(head, complete):
        return "aac"
    return None


def _at(offset: int, magic: bytes) -> Callable[[bytes], bool]:
    return lambda head: head[offset : offset + len(magic)] == magic


def _riff_wave(head: bytes) -> bool:
    return head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE"


def _aiff(head: bytes) -> bool:
    return head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC")


def _id3(head: bytes) -> bool:
    # "ID3", major version 2..4, revision < 0xFF, then four syncsafe size bytes.
    return (
        len(head) >= 10
        and head[:3] == b"ID3"
        and 2 <= head[3] <= 4
        and head[4] != 0xFF
        and all(b < 0x80 for b in head[6:10])
    )


def _quicktime(head: bytes) -> bool:
    if len(head) < 8 or head[4:8] not in _QUICKTIME_BOXES:
        return False
    if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
        return False
    size = int.from_bytes(head[:4], "big")
    return size in (0, 1) or size >= 8


def _ac3(head: bytes) -> bool:
    if len(head) < 6 or head[:2] != b"\x0b\x77":
        return False
    bsid = head[5] >> 3
    if 11 <= bsid <= 16:  # E-AC-3 uses a different header layout
        return True
    fscod, frmsizecod = head[4] >> 6, head[4] & 0x3F
    return bsid <= 10 and fscod != 3 and frmsizecod < 38


def _dff(head: bytes) -> bool:
    return head[:4] == b"FRM8" and head[12:16] == b"DSD "


_MAGIC: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("wav", _riff_wave),
    ("w64", _at(0, _W64_RIFF_GUID)),
    ("aiff", _aiff),
    ("flac", _at(0, b"fLaC")),
    ("ogg", _at(0, b"OggS")),
    ("mp3", _id3),
    ("mp4", _quicktime),
    ("caf", _at(0, b"caff")),
    ("webm", lambda head: head[:4] == _EBML and b"webm" in head[:64]),
    ("matroska", _at(0, _EBML)),
    ("au", _at(0, b".snd")),
    ("amr", _at(0, b"#!AMR")),
    ("ac3", _ac3),
    ("dts", _at(0, b"\x7f\xfe\x80\x01")),
    ("wavpack", _at(0, b"wvpk")),
    ("tta", _at(0, b"TTA1")),
    ("ape", _at(0, b"MAC ")),
    ("mpc", lambda head: head[:4] == b"MPCK" or head[:3] == b"MP+"),
    ("voc", _at(0, b"Creative Voice File\x1a")),
    ("dsf", _at(0, b"DSD ")),
    ("dff", _dff),
    ("asf", _at(0, _ASF_GUID)),
)


def _mpeg_frame(head: bytes, pos: int) -> tuple[int, int, int] | None:
    """(version, layer, frame length) of a valid MPEG audio header at ``pos``."""
    if len(head) < pos + 4:
        return None
    b1, b2, b3 = head[pos + 1], head[pos + 2], head[pos + 3]
    if head[pos] != 0xFF or b1 & 0xE0 != 0xE0:
        return None
    version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
    # Reserved values, and free-format bitrate (index 0), which real encoders
    # practically never write, are refused.
    if version == 1 or layer == 0 or bitrate_index in (0, 15) or rate_index == 3 or b3 & 3 == 2:
        return None
    layer_no = 4 - layer  # layer bits 3, 2, 1 mean Layer I, II, III
    table = _V1 if version == 3 else _V2
    bitrate = table[layer_no][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    padding = (b2 >> 1) & 1
    if layer_no == 1:
        length = (12 * bitrate // rate + padding) * 4
    elif layer_no == 3 and version != 3:
        length = 72 * bitrate // rate + padding
    else:
        length = 144 * bitrate // rate + padding
    return version, layer, length


def _is_mpeg_audio(head: bytes, complete: bool) -> bool:
    first = _mpeg_frame(head, 0)
    if first is None:
        return False
    version, layer, length = first
    if len(head) < length + 4:
        # Out of sight, one valid header is the best evidence; in a whole file, too little.
        return not complete
    second = _mpeg_frame(head, length)
    return second is not None and second[:2] == (version, layer)


def _adts_length(head: bytes, pos: int) -> int | None:
    if len(head) < pos + 7 or head[pos] != 0xFF or head[pos + 1] & 0xF6 != 0xF0:
        return None
    if (head[pos + 2] >> 2) & 0xF >= _ADTS_RATES:
        return None
    length = ((head[pos + 3] & 3) << 11) | (head[pos + 4] << 3) | (head[pos + 5] >> 5)
    return length if length >= 7 else None


def _is_adts(head: bytes, complete: bool) -> bool:
    length = _adts_length(head, 0)
    if length is None:
        return False
    if len(head) < length + 7:
        return not complete
    return _adts_length(head, length) is not None
