"""Sparrow's canonical audio files: little-endian RIFF/WAVE, 16- or 24-bit PCM.

Every node's audio is stored in this one format, written either by FFmpeg
(decoded uploads) or by ``write_wav`` (generated audio). Both write the same
layout: a 16-byte ``fmt`` chunk for 16-bit mono/stereo, ``WAVE_FORMAT_EXTENSIBLE``
for 24-bit or more than two channels, and no metadata chunks.

The reader here is deliberately strict and small: it accepts only that format
and counts frames from the ``data`` chunk size, which must lie wholly inside
the file. Anything else raises ``WavFormatError`` (a ``ValueError``): for a
stored file that means corruption, a server-side problem, not bad input.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sparrow.audio.atomic import publish, removing_on_error, temp_path_for

_PCM = 1
_EXTENSIBLE = 0xFFFE
_PCM_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_MAX_RIFF = 0xFFFFFFFF
_MAX_FMT = 1024
_HASH_CHUNK = 1 << 20
_WRITE_CHUNK_FRAMES = 1 << 18

IntPCM = npt.NDArray[np.int16] | npt.NDArray[np.int32]


class WavFormatError(ValueError):
    """The file is not a canonical Sparrow WAV (16/24-bit PCM RIFF/WAVE)."""


@dataclass(frozen=True)
class AudioInfo:
    """What Sparrow records about a canonical WAV file."""

    sample_rate: int
    channels: int
    frames: int
    """Exact sample frames per channel."""
    bits: int
    """16 or 24."""
    sha256: str
    """Hex SHA-256 of the whole file's bytes."""

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class WavLayout:
    """Where the samples of a canonical WAV are and how they are packed."""

    sample_rate: int
    channels: int
    bits: int
    frames: int
    data_offset: int

    @property
    def block_align(self) -> int:
        return self.channels * self.bits // 8


def read_layout(path: Path) -> WavLayout:
    """Parse the header of a canonical WAV; ``WavFormatError`` if it is not one."""
    with path.open("rb") as f:
        size = path.stat().st_size
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            raise WavFormatError(f"{path.name}: not a RIFF/WAVE file")
        fmt: tuple[int, int, int] | None = None
        while True:
            header = f.read(8)
            if len(header) < 8:
                raise WavFormatError(f"{path.name}: no data chunk")
            chunk_id, chunk_size = header[:4], int.from_bytes(header[4:], "little")
            if chunk_id == b"fmt ":
                if chunk_size > _MAX_FMT:
                    raise WavFormatError(f"{path.name}: fmt chunk of {chunk_size} bytes")
                fmt = _parse_fmt(path, f.read(chunk_size))
                f.seek(chunk_size & 1, 1)
            elif chunk_id == b"data":
                break
            else:
                f.seek(chunk_size + (chunk_size & 1), 1)
        if fmt is None:
            raise WavFormatError(f"{path.name}: data chunk before fmt chunk")
        channels, sample_rate, bits = fmt
        data_offset = f.tell()
    block_align = channels * bits // 8
    if chunk_size > size - data_offset:
        raise WavFormatError(
            f"{path.name}: data chunk claims {chunk_size} bytes, file holds {size - data_offset}"
        )
    if chunk_size % block_align:
        raise WavFormatError(f"{path.name}: data size is not a whole number of frames")
    return WavLayout(sample_rate, channels, bits, chunk_size // block_align, data_offset)


def _parse_fmt(path: Path, body: bytes) -> tuple[int, int, int]:
    if len(body) < 16:
        raise WavFormatError(f"{path.name}: short fmt chunk")
    tag, channels, sample_rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _EXTENSIBLE:
        if len(body) < 40 or body[26:40] != _PCM_GUID_TAIL or body[24:26] != b"\x01\x00":
            raise WavFormatError(f"{path.name}: extensible format is not PCM")
        valid_bits = int.from_bytes(body[18:20], "little")
        if valid_bits not in (0, bits):
            raise WavFormatError(f"{path.name}: {valid_bits} valid bits in {bits}-bit samples")
    elif tag != _PCM:
        raise WavFormatError(f"{path.name}: format tag {tag:#06x} is not PCM")
    if bits not in (16, 24) or channels < 1 or sample_rate < 1:
        raise WavFormatError(f"{path.name}: {channels} ch, {sample_rate} Hz, {bits}-bit")
    if block_align != channels * bits // 8:
        raise WavFormatError(f"{path.name}: block align {block_align} does not match")
    return channels, sample_rate, bits


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_wav_info(path: Path) -> AudioInfo:
    """Header facts and SHA-256 of a canonical WAV (reads the whole file once for the hash)."""
    layout = read_layout(path)
    return AudioInfo(
        sample_rate=layout.sample_rate,
        channels=layout.channels,
        frames=layout.frames,
        bits=layout.bits,
        sha256=file_sha256(path),
    )


def open_pcm(path: Path, layout: WavLayout) -> npt.NDArray[np.int16] | npt.NDArray[np.uint8]:
    """The samples as a read-only memory map, without copying.

    16-bit: int16 of shape (frames, channels). 24-bit: uint8 of shape
    (frames, channels, 3); convert slices with ``pcm24_to_int32``.
    """
    if layout.frames == 0 and layout.bits == 16:  # mmap cannot map zero bytes
        return np.zeros((0, layout.channels), dtype=np.int16)
    if layout.frames == 0:
        return np.zeros((0, layout.channels, 3), dtype=np.uint8)
    if layout.bits == 16:
        return np.memmap(
            path, dtype="<i2", mode="r", offset=layout.data_offset,
            shape=(layout.frames, layout.channels),
        )  # fmt: skip
    return np.memmap(
        path, dtype=np.uint8, mode="r", offset=layout.data_offset,
        shape=(layout.frames, layout.channels, 3),
    )  # fmt: skip


def pcm24_to_int32(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.int32]:
    """Little-endian 3-byte samples (..., 3) to sign-extended int32 (...)."""
    b = raw.astype(np.int32)
    packed = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    # Shift the 24-bit value to the top and back to sign-extend it.
    return (packed << 8) >> 8


def read_wav(path: Path) -> npt.NDArray[np.float32]:
    """The samples of a canonical WAV as float32 (frames, channels) in [-1, 1)."""
    layout = read_layout(path)
    return float_samples(open_pcm(path, layout), layout.bits)


def float_samples(
    pcm: npt.NDArray[np.int16] | npt.NDArray[np.uint8], bits: int
) -> npt.NDArray[np.float32]:
    """Frames of ``open_pcm`` (all of them or a slice) as float32 in [-1, 1): each sample
    over 2^15 or 2^23, exactly as FFmpeg turns PCM into floats."""
    if bits == 16:
        return pcm.astype(np.float32) / np.float32(32768.0)
    ints = pcm24_to_int32(pcm.view(np.uint8))
    return ints.astype(np.float32) / np.float32(8388608.0)


def write_wav(
    path: Path, samples: npt.ArrayLike, sample_rate: int, bits: int = 16, *, durable: bool = True
) -> AudioInfo:
    """Write float samples (frames, channels) as a canonical WAV, atomically.

    A 1-D array is taken as mono. Values are clipped to [-1, 1] (NaN becomes
    0) and quantised with rounding: x·32768 for 16-bit, x·8388608 for 24-bit,
    the inverse of ``read_wav``. The file appears at ``path`` only once complete;
    ``durable``: fsynced there too (a scratch copy read once and removed is not).
    """
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] < 1:
        raise ValueError(f"samples must be (frames, channels), got shape {audio.shape}")
    if bits not in (16, 24):
        raise ValueError(f"bits must be 16 or 24, got {bits}")
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    frames, channels = audio.shape
    header = _header(frames, channels, sample_rate, bits)
    if len(header) - 8 + frames * channels * bits // 8 > _MAX_RIFF:
        raise ValueError("audio too long for a RIFF/WAVE file")
    digest = hashlib.sha256(header)
    tmp = temp_path_for(path)
    with removing_on_error(tmp), tmp.open("wb") as f:
        f.write(header)
        for start in range(0, frames, _WRITE_CHUNK_FRAMES):
            block = _quantise(audio[start : start + _WRITE_CHUNK_FRAMES], bits)
            digest.update(block)
            f.write(block)
        if (frames * channels * bits // 8) & 1:
            digest.update(b"\x00")
            f.write(b"\x00")
    with removing_on_error(tmp):
        if durable:
            publish(tmp, path)
        else:
            os.replace(tmp, path)
    return AudioInfo(sample_rate, channels, frames, bits, digest.hexdigest())


def _quantise(block: npt.NDArray[np.float32], bits: int) -> bytes:
    full_scale = float(1 << (bits - 1))
    clean = np.nan_to_num(block, nan=0.0, posinf=1.0, neginf=-1.0)
    ints: npt.NDArray[np.int32] = np.clip(
        np.rint(clean * full_scale), -full_scale, full_scale - 1
    ).astype(np.dtype("<i4"), order="C")  # C order: a transposed view stays frame by frame
    if bits == 16:
        return bytes(ints.astype(np.dtype("<i2")).tobytes())
    return bytes(ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes())


def _header(frames: int, channels: int, sample_rate: int, bits: int) -> bytes:
    block_align = channels * bits // 8
    data_size = frames * block_align
    common = struct.pack(
        "<HIIHH", channels, sample_rate, sample_rate * block_align, block_align, bits
    )
    if bits == 16 and channels <= 2:
        fmt = struct.pack("<H", _PCM) + common
    else:
        mask = {1: 0x4, 2: 0x3}.get(channels, 0)
        fmt = (
            struct.pack("<H", _EXTENSIBLE)
            + common
            + struct.pack("<HHI", 22, bits, mask)
            + b"\x01\x00"
            + _PCM_GUID_TAIL
        )
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", data_size)
    # A chunk of odd size is followed by one pad byte, counted in the RIFF size.
    return b"RIFF" + struct.pack("<I", len(body) + data_size + (data_size & 1)) + body
