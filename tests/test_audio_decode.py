"""decode_upload over the good and bad upload corpora, and its process hygiene."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import corpus
import numpy as np
import pytest
from corpus import BAD_NAMES, GOOD_NAMES, BadUpload, GoodUpload
from helpers import child_processes
from hypothesis import given
from hypothesis import strategies as st

from sparrow.audio import decode_upload, read_wav, read_wav_info, sniff, write_wav
from sparrow.audio.canary import CANARY_TIMEOUT_S
from sparrow.audio.ffmpeg import FFmpegResult, run_ffmpeg
from sparrow.audio.probe import AudioStream, parse_probe
from sparrow.errors import (
    EngineUnavailable,
    InvalidInput,
    PayloadTooLarge,
    SparrowError,
    UnsupportedMedia,
)

pytestmark = pytest.mark.anyio

ERRORS: dict[int, type[SparrowError]] = {
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: InvalidInput,
}
LIMIT_S = 600.0
SNIFF_NAMES = {
    "wav", "w64", "aiff", "flac", "ogg", "mp3", "mp4", "caf", "webm", "matroska", "au", "amr",
    "ac3", "dts", "wavpack", "tta", "ape", "mpc", "voc", "dsf", "dff", "asf", "aac",
}  # fmt: skip


@pytest.fixture
def good(good_uploads: dict[str, GoodUpload]) -> dict[str, GoodUpload]:
    return good_uploads


@pytest.fixture
def bad(bad_uploads: dict[str, BadUpload]) -> dict[str, BadUpload]:
    return bad_uploads


def _names(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def _fake_ffmpeg(folder: Path, body: str) -> Path:
    script = folder / "fake-ffmpeg"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize("name", GOOD_NAMES)
async def test_good_upload_becomes_a_canonical_wav(
    good: dict[str, GoodUpload], tmp_path: Path, name: str
) -> None:
    case = good[name]
    dst = tmp_path / "node.wav"

    result = await decode_upload(case.path, dst, max_duration_s=LIMIT_S, timeout_s=30)

    info = result.info
    assert (info.sample_rate, info.channels, info.bits) == (
        case.sample_rate,
        case.channels,
        case.bits,
    )
    if case.frames is not None:
        assert info.frames == case.frames
    assert info.duration_s == pytest.approx(case.duration_s, abs=case.tolerance_s + 1e-9)
    assert result.source_codec == case.codec
    assert read_wav_info(dst) == info
    assert _names(tmp_path) == [dst.name]
    samples = read_wav(dst)
    assert samples.shape == (info.frames, info.channels)
    assert float(np.sqrt(np.mean(samples**2))) > 0.01  # the music survived


async def test_source_formats_are_named_from_content(
    good: dict[str, GoodUpload], tmp_path: Path
) -> None:
    formats = {}
    for name in ("mp3_named_flac", "m4a_aac", "aiff", "flac_16", "ogg_opus"):
        result = await decode_upload(
            good[name].path, tmp_path / f"{name}.wav", max_duration_s=LIMIT_S, timeout_s=30
        )
        formats[name] = result.source_format
    assert formats == {
        "mp3_named_flac": "mp3",
        "m4a_aac": "mov,mp4,m4a,3gp,3g2,mj2",
        "aiff": "aiff",
        "flac_16": "flac",
        "ogg_opus": "ogg",
    }


async def test_lossless_upload_is_bit_exact(good: dict[str, GoodUpload], tmp_path: Path) -> None:
    source = good["flac_16"].path.parent / "source-44k-stereo.wav"
    dst = tmp_path / "node.wav"
    await decode_upload(good["flac_16"].path, dst, max_duration_s=LIMIT_S, timeout_s=30)
    np.testing.assert_array_equal(read_wav(dst), read_wav(source))


async def test_same_upload_gives_the_same_bytes(
    good: dict[str, GoodUpload], tmp_path: Path
) -> None:
    first = await decode_upload(
        good["mp3"].path, tmp_path / "a.wav", max_duration_s=60, timeout_s=30
    )
    again = await decode_upload(
        good["mp3"].path, tmp_path / "b.wav", max_duration_s=60, timeout_s=30
    )
    assert first.info.sha256 == again.info.sha256


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_upload_gets_its_documented_outcome(
    bad: dict[str, BadUpload], tmp_path: Path, name: str
) -> None:
    case = bad[name]
    dst = tmp_path / "node.wav"
    limit = case.max_duration_s or LIMIT_S

    if case.status == 201:
        result = await decode_upload(case.path, dst, max_duration_s=limit, timeout_s=30)
        assert result.info.frames > 0
        assert read_wav_info(dst) == result.info
        assert _names(tmp_path) == [dst.name]
        return

    with pytest.raises(ERRORS[case.status]) as raised:
        await decode_upload(case.path, dst, max_duration_s=limit, timeout_s=30)
    assert raised.value.status_code == case.status
    assert raised.value.code == case.code
    assert raised.value.detail.endswith(".")
    assert "Traceback" not in raised.value.detail
    assert _names(tmp_path) == []


async def test_accepted_oddities_keep_what_is_really_there(
    bad: dict[str, BadUpload], tmp_path: Path
) -> None:
    streaming = await decode_upload(
        bad["wav_datasize_ffffffff"].path, tmp_path / "a.wav", max_duration_s=60, timeout_s=30
    )
    assert streaming.info.frames == 44100  # the samples present, not the 4 GiB the header claims
    truncated = await decode_upload(
        bad["truncated_mp3"].path, tmp_path / "b.wav", max_duration_s=60, timeout_s=30
    )
    assert 0.4 < truncated.info.duration_s < 0.8  # about 3/5 of the 1 s original


async def test_over_duration_message_names_both_lengths(
    bad: dict[str, BadUpload], tmp_path: Path
) -> None:
    with pytest.raises(PayloadTooLarge, match=r"The audio is 3\.0 s long; the limit is 2 s\."):
        await decode_upload(
            bad["over_duration"].path, tmp_path / "n.wav", max_duration_s=2, timeout_s=30
        )


@pytest.mark.parametrize("size", [1, 2, 3, 10, 100, 417, 1000, 4096, 4097, 100_000])
async def test_random_bytes_are_never_audio(tmp_path: Path, size: int) -> None:
    async def one(seed: int) -> None:
        src = tmp_path / f"r{seed}"
        src.write_bytes(np.random.default_rng([seed, size]).bytes(size))
        with pytest.raises(UnsupportedMedia):
            await decode_upload(src, tmp_path / f"r{seed}.wav", max_duration_s=60, timeout_s=30)

    await asyncio.gather(*(one(seed) for seed in range(6)))
    assert _names(tmp_path) == sorted(f"r{seed}" for seed in range(6))  # only the inputs


async def test_metadata_cannot_forge_the_stream_description(tmp_path: Path) -> None:
    source = tmp_path / "in.wav"
    write_wav(source, corpus.music(0.5, 44100, 2), 44100)
    forged = "x\nInput #0, wav, from 'y':\n  Stream #0:0: Audio: pcm_f64le, 192000 Hz, 7.1, dbl"
    evil = tmp_path / "evil"
    corpus.ffmpeg("-i", str(source), "-metadata", f"title={forged}", "-c:a", "libmp3lame",
                  "-f", "mp3", str(evil))  # fmt: skip

    result = await decode_upload(evil, tmp_path / "n.wav", max_duration_s=60, timeout_s=30)

    assert (result.source_format, result.source_codec) == ("mp3", "mp3")
    assert (result.info.sample_rate, result.info.channels, result.info.bits) == (44100, 2, 16)


async def test_timeout_kills_ffmpeg_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "long"
    corpus.ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=20:r=48000", "-ac", "2", "-c:a", "flac",
                  "-f", "flac", str(src))  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(InvalidInput, match=r"^Decoding took longer than 0\.05 s"):
        await decode_upload(src, out / "n.wav", max_duration_s=600, timeout_s=0.05)

    assert _names(out) == []
    assert child_processes() == []


async def test_hung_ffmpeg_is_killed_at_the_deadline(
    tmp_path: Path, good: dict[str, GoodUpload]
) -> None:
    fake = str(_fake_ffmpeg(tmp_path, "exec sleep 30"))
    out = tmp_path / "out"
    out.mkdir()
    started = time.monotonic()

    # FFmpeg hangs on everything, its canary too: the server's trouble, not the file's.
    with pytest.raises(EngineUnavailable, match=r"did not finish a 0\.25 s test render"):
        await decode_upload(
            good["flac_16"].path, out / "n.wav", max_duration_s=60, timeout_s=0.5, ffmpeg=fake
        )

    assert time.monotonic() - started < 0.5 + CANARY_TIMEOUT_S + 2
    assert _names(out) == []
    assert child_processes() == []


async def test_cancelled_decode_leaves_no_process_or_file(
    tmp_path: Path, good: dict[str, GoodUpload]
) -> None:
    fake = str(_fake_ffmpeg(tmp_path, "exec sleep 30"))
    out = tmp_path / "out"
    out.mkdir()
    task = asyncio.create_task(
        decode_upload(
            good["flac_16"].path, out / "n.wav", max_duration_s=60, timeout_s=60, ffmpeg=fake
        )
    )
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _names(out) == []
    assert child_processes() == []


async def test_flood_of_stderr_is_drained_and_capped(tmp_path: Path) -> None:
    flood = "head -c 20000000 /dev/zero | tr '\\0' 'x' >&2; exit 1"
    fake = str(_fake_ffmpeg(tmp_path, flood))
    loop = asyncio.get_running_loop()

    result = await run_ffmpeg([], deadline=loop.time() + 20, ffmpeg=fake)

    assert result.returncode == 1
    assert len(result.stderr) == 256 * 1024


async def test_ffmpeg_runs_under_memory_and_cpu_limits(tmp_path: Path) -> None:
    script = _fake_ffmpeg(tmp_path, "ulimit -v >&2; ulimit -t >&2; ulimit -c >&2; env >&2")
    loop = asyncio.get_running_loop()

    result = await run_ffmpeg([], deadline=loop.time() + 10, ffmpeg=str(script))

    memory_kib, cpu_s, core, *environment = result.stderr.split()
    assert int(memory_kib) == 2 * 1024 * 1024
    assert 1 <= int(cpu_s) <= 21
    assert core == "0"
    # A minimal environment: nothing of the server's reaches the decoder.
    names = {line.split("=", 1)[0] for line in environment}
    assert names <= {"PATH", "MALLOC_ARENA_MAX", "LC_ALL", "PWD", "SHLVL", "_", "OLDPWD"}


@pytest.mark.skipif(shutil.which("nice") is None, reason="coreutils' nice")
async def test_background_ffmpeg_runs_at_the_lowest_cpu_priority(tmp_path: Path) -> None:
    script = _fake_ffmpeg(tmp_path, "nice >&2")  # coreutils' nice prints the niceness
    loop = asyncio.get_running_loop()

    lowered = await run_ffmpeg([], deadline=loop.time() + 10, ffmpeg=str(script), background=True)
    plain = await run_ffmpeg([], deadline=loop.time() + 10, ffmpeg=str(script))

    assert int(lowered.stderr) == 19
    assert int(plain.stderr) == os.getpriority(os.PRIO_PROCESS, 0)


async def test_concurrent_decodes(good: dict[str, GoodUpload], tmp_path: Path) -> None:
    names = ["mp3", "flac_24", "ogg_vorbis", "m4a_aac", "wav_5_1", "aiff", "ogg_opus", "wav_f32"]
    results = await asyncio.gather(
        *(
            decode_upload(good[n].path, tmp_path / f"{n}.wav", max_duration_s=60, timeout_s=30)
            for n in names
        )
    )
    assert [r.info.sample_rate for r in results] == [good[n].sample_rate for n in names]
    assert _names(tmp_path) == sorted(f"{n}.wav" for n in names)
    assert child_processes() == []


def test_sniff_recognises_containers_from_magic_numbers(good: dict[str, GoodUpload]) -> None:
    expected = {
        "wav_s16_44k_stereo": "wav",
        "mp3": "mp3",
        "mp3_named_flac": "mp3",
        "flac_24": "flac",
        "ogg_vorbis": "ogg",
        "ogg_opus": "ogg",
        "m4a_aac": "mp4",
        "aac_adts": "aac",
        "aiff": "aiff",
    }
    assert {n: sniff(good[n].path.read_bytes()[:64]) for n in expected} == expected


def test_sniff_refuses_non_audio(bad: dict[str, BadUpload]) -> None:
    for name in ("one_byte", "png_named_wav", "text_file", "html_file", "hls_playlist"):
        assert sniff(bad[name].path.read_bytes()[:4096]) is None, name


@given(st.binary(max_size=200), st.booleans())
def test_sniff_never_fails_on_arbitrary_bytes(head: bytes, complete: bool) -> None:
    assert sniff(head, complete=complete) in {None, *SNIFF_NAMES}


@given(st.text(max_size=400))
def test_probe_parser_never_fails_on_arbitrary_text(stderr: str) -> None:
    parse_probe(stderr)


def test_probe_parser_reads_ffmpeg_descriptions() -> None:
    probe = parse_probe(
        "[in#0 @ 0x5] Format mp3 detected only with low score of 1, misdetection possible!\n"
        "Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/tmp/upload-1':\n"
        "  Metadata:\n"
        "    title           : x\n"
        "                    :   Stream #0:0: Audio: pcm_f64le, 192000 Hz, 7.1, dbl\n"
        "  Duration: 00:01:02.50, start: 0.000000, bitrate: 134 kb/s\n"
        "  Stream #0:0[0x1](und): Video: h264, yuv420p, 32x32, 5 fps\n"
        "  Stream #0:1[0x2](und): Audio: alac (alac / 0x63616C61), 96000 Hz, 5.1(side), "
        "s32p (24 bit), 2304 kb/s (default)\n"
    )
    assert probe.format == "mov,mp4,m4a,3gp,3g2,mj2"
    assert probe.low_score
    assert probe.duration_s == 62.5
    assert probe.audio == AudioStream("alac", 96000, 6, "5.1(side)", "s32p", 24)


@pytest.mark.parametrize(
    ("line", "fmt"),
    [
        ("opus, 48000 Hz, mono, fltp (default)", "fltp"),
        ("flac, 44100 Hz, stereo, s16 (default) (forced)", "s16"),
        ("flac, 96000 Hz, stereo, s32 (24 bit) (default)", "s32"),
    ],
)
def test_probe_reads_sample_format_before_disposition_flags(line: str, fmt: str) -> None:
    probe = parse_probe(f"Input #0, matroska,webm, from 'f':\n  Stream #0:0: Audio: {line}\n")
    assert probe.audio is not None
    assert probe.audio.sample_fmt == fmt


_SERVER_RUNNING_FFMPEG = """
import asyncio
from sparrow.audio.ffmpeg import FFmpegResult, run_ffmpeg

async def main() -> None:
    deadline = asyncio.get_running_loop().time() + 120
    quiet = ["-nostats", "-loglevel", "error"]  # nothing on stderr: no SIGPIPE to end it
    args = [*quiet, "-re", "-f", "lavfi", "-i", "sine=d=120", "-f", "null", "-"]
    await run_ffmpeg(args, deadline=deadline)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ffmpeg_dies_with_a_killed_server() -> None:
    server = subprocess.Popen([sys.executable, "-c", _SERVER_RUNNING_FFMPEG])
    try:
        deadline = time.monotonic() + 20
        while not (ffmpeg := child_processes(of=server.pid)):
            assert time.monotonic() < deadline, "FFmpeg did not start"
            time.sleep(0.02)
        time.sleep(0.2)  # past the exec of setpriv and FFmpeg
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 5
        while _alive(ffmpeg[0]):
            assert time.monotonic() < deadline, "FFmpeg outlived the killed server"
            time.sleep(0.02)
    finally:
        server.kill()
        server.wait(10)


async def test_a_usual_kind_takes_one_ffmpeg_and_gives_the_bytes_of_a_probe_and_decode(
    good: dict[str, GoodUpload], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kinds with a usual plan are decoded by one FFmpeg that describes them as it goes.
    Where the guess holds (16-bit stereo FLAC, MP3, Ogg, WAV) that is the only FFmpeg;
    where it does not (24-bit FLAC, 5.1 and float WAV) it is stopped once it has
    described the file, and a second decodes with the right plan. Either way the result
    is the bytes of a probe followed by a decode, and nothing else is left behind."""
    from sparrow.audio import decode

    runs: list[FFmpegResult] = []
    real_run = run_ffmpeg  # the function decode calls

    async def counted(*args: Any, **kwargs: Any) -> FFmpegResult:
        result = await real_run(*args, **kwargs)
        runs.append(result)
        return result

    monkeypatch.setattr(decode, "run_ffmpeg", counted)
    usual = ["wav_s16_44k_stereo", "mp3", "ogg_vorbis", "flac_16"]
    unusual = ["flac_24", "wav_5_1", "wav_f32"]
    guessed = {}
    for n in usual + unusual:
        runs.clear()
        guessed[n] = await decode_upload(
            good[n].path, tmp_path / f"{n}.wav", max_duration_s=60, timeout_s=30
        )
        stopped = [run.stopped for run in runs]
        assert stopped == ([False] if n in usual else [True, False]), n
    monkeypatch.setattr(decode, "_LIKELY", {})
    for n in usual + unusual:
        runs.clear()
        after = await decode_upload(
            good[n].path, tmp_path / f"{n}-after.wav", max_duration_s=60, timeout_s=30
        )
        assert len(runs) == 2, n  # the probe, then the decode
        assert after.info.sha256 == guessed[n].info.sha256, n
        assert after.source_format == guessed[n].source_format, n
        assert after.source_codec == guessed[n].source_codec, n
    names = usual + unusual
    assert _names(tmp_path) == sorted(
        [f"{n}.wav" for n in names] + [f"{n}-after.wav" for n in names]
    )
    assert child_processes() == []


async def test_level_tags_split_ffmpeg_output_into_what_info_and_error_levels_print(
    good: dict[str, GoodUpload], tmp_path: Path
) -> None:
    """One decode at ``-loglevel level+info`` gives the upload decoder both the input's
    description and the error lines: the same text two runs at ``info`` and at ``error``
    print (pointers and speed aside), for a FLAC damaged in the middle."""
    from sparrow.audio.decode import _split_levels

    data = bytearray(good["flac_16"].path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = bytes(range(250)) * 16
    damaged = tmp_path / "damaged.flac"
    damaged.write_bytes(bytes(data))

    async def stderr(level: str) -> str:
        args = ["-hide_banner", "-nostdin", "-nostats", "-loglevel", level, "-threads", "1"]
        args += ["-i", str(damaged), "-f", "wav", "-y", str(tmp_path / "out.wav")]
        run = await run_ffmpeg(args, deadline=asyncio.get_running_loop().time() + 30)
        # Pointers and the closing line's speed differ from run to run.
        return re.sub(r"0x[0-9a-f]+|speed=.*", "", run.stderr)

    every, errors = _split_levels(await stderr("level+info"))
    assert errors and errors == await stderr("error")
    assert every == await stderr("info")
    assert "Stream mapping:" in every and "[info]" not in every + errors
