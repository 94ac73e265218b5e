"""Sparrow's audio layer: decoding uploads, canonical WAV files, peaks, synthesis.

Everything that touches FFmpeg or sample data lives here; FFmpeg's failures
are translated into Sparrow errors at this boundary.
"""

from sparrow.audio.decode import DecodedUpload, decode_upload
from sparrow.audio.ffmpeg import ffmpeg_exe
from sparrow.audio.peaks import compute_peaks
from sparrow.audio.sniff import sniff
from sparrow.audio.synth import render_music
from sparrow.audio.wav import AudioInfo, WavFormatError, read_wav, read_wav_info, write_wav

__all__ = [
    "AudioInfo",
    "DecodedUpload",
    "WavFormatError",
    "compute_peaks",
    "decode_upload",
    "ffmpeg_exe",
    "read_wav",
    "read_wav_info",
    "render_music",
    "sniff",
    "write_wav",
]
