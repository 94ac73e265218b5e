"""Upload decoding: ``POST /api/chains`` of a clip against a plain FFmpeg decode, same run.

    python -m bench --only upload

The clip is ``render_music`` audio, 44.1 kHz stereo, encoded once to FLAC and to
MP3 (libmp3lame, VBR quality 2). Timed, interleaved, median of the rounds:

- ``upload``: the whole request against a real Sparrow server (uvicorn, child
  process) from an ``httpx.Client`` in this process: the multipart body streamed
  to disk, content sniffing, an FFmpeg probe, the bounded FFmpeg decode to the
  canonical WAV, its hash and fsync, and the chain's rows — until the 201 arrives;
- ``ffmpeg``: baseline — ``ffmpeg -i file -f wav out`` of the same file with the
  same binary, started from this process.

Both are reported as seconds of audio decoded per wall second; the ratio is what
receiving, checking and storing the upload costs on top of decoding it.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import servers
from bench.seed import analysed
from bench.table import Options, Row
from bench.timing import rotations
from sparrow.audio import render_music, write_wav
from sparrow.audio.ffmpeg import ffmpeg_exe

RATE, CHANNELS = 44_100, 2
CODECS = {
    "flac": ["-c:a", "flac"],
    "mp3": ["-c:a", "libmp3lame", "-q:a", "2"],
}
QUIET = ["-nostdin", "-hide_banner", "-loglevel", "error"]


@dataclass(frozen=True)
class Sizes:
    seconds: float
    repeat: int


QUICK = Sizes(seconds=60.0, repeat=2)
FULL = Sizes(seconds=60.0, repeat=7)


def encode(folder: Path, seconds: float, codec: str) -> Path:
    """``seconds`` of 44.1 kHz stereo music, encoded with ``codec``."""
    wav = folder / "source.wav"
    if not wav.exists():
        write_wav(wav, render_music(seconds, RATE, CHANNELS, seed=7), RATE)
    out = folder / f"clip.{codec}"
    ffmpeg = [ffmpeg_exe(), *QUIET, "-i", str(wav), *CODECS[codec], "-y", str(out)]
    subprocess.run(ffmpeg, check=True)
    return out


def plain_decode(src: Path, dst: Path) -> None:
    """The baseline: ``ffmpeg -i src -f wav dst``."""
    subprocess.run([ffmpeg_exe(), *QUIET, "-i", str(src), "-f", "wav", "-y", str(dst)], check=True)


def upload(client: httpx.Client, body: bytes, name: str) -> tuple[str, str]:
    """``POST /api/chains`` of ``body``; the new chain's id and its root's."""
    response = client.post("/api/chains", files={"file": (name, body)})
    assert response.status_code == 201, response.text
    created = response.json()
    return created["chain"]["id"], created["root"]["id"]


def compare(client: httpx.Client, src: Path, scratch: Path, repeat: int) -> tuple[float, float]:
    """(upload, ffmpeg): median wall seconds of each, interleaved.

        The uploaded chains are deleted between rounds, outside the timing, once the
    analyser (librosa, in the server, after the 201) is done with them.
    """
    body = src.read_bytes()
    samples: dict[str, list[float]] = {"upload": [], "ffmpeg": []}
    for order in rotations(list(samples), repeat):
        for name in order:
            start = time.perf_counter()
            if name == "upload":
                chain_id, root_id = upload(client, body, src.name)
            else:
                plain_decode(src, scratch / "plain.wav")
            samples[name].append(time.perf_counter() - start)
            if name == "upload":
                # Its analysis runs in the background: let it end before the next round.
                analysed(client, [root_id])
                assert client.delete(f"/api/chains/{chain_id}").status_code == 204
    return statistics.median(samples["upload"]), statistics.median(samples["ffmpeg"])


def table_rows(options: Options) -> list[Row]:
    sizes = QUICK if options.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with (
            servers.serve("sparrow", folder, "--data-dir", str(folder / "data")) as url,
            httpx.Client(base_url=url, timeout=120) as client,
        ):
            for codec in CODECS:
                src = encode(folder, sizes.seconds, codec)
                t_upload, t_ffmpeg = compare(client, src, folder, sizes.repeat)
                rows.append(
                    Row(
                        f"upload of {sizes.seconds:g} s {codec.upper()}: POST /api/chains "
                        "vs ffmpeg -i … -f wav",
                        sizes.seconds / t_upload,
                        sizes.seconds / t_ffmpeg,
                        "audio s/s",
                    )
                )
    return rows
