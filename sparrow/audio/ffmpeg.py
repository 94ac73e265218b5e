"""Finding the FFmpeg binary and running it on untrusted input.

``ffmpeg_exe(configured)`` picks the binary: the configured one
(``Settings.ffmpeg``, ``SPARROW_FFMPEG``) when given, else ``ffmpeg`` on
``PATH``, else the static binary shipped in the ``imageio-ffmpeg`` wheel — so a
plain ``pip install`` always has one.

``run_ffmpeg()`` runs one FFmpeg process without blocking the event loop and
with three bounds, because the input is whatever a client uploaded:

- wall clock: past ``deadline`` the process is killed, reaped, and
  ``FFmpegTimeout`` is raised;
- memory and CPU: address-space and CPU limits (and no core files) are set by
  ``sh``'s ``ulimit`` just before it ``exec``s FFmpeg, so a decoder bomb fails
  inside FFmpeg instead of taking the server down;
- output: stderr is drained to the end (a full pipe would stall FFmpeg) but only
  its first ``STDERR_LIMIT`` bytes are kept;
- lifetime: FFmpeg dies with the server's process (``setpriv --pdeathsig``), so a
  server killed by SIGKILL leaves no decoder or encoder running on.

Background work (a node's analysis) runs FFmpeg at nice 19 (``background=True``).

A caller may watch stderr as it arrives (``stop_when``) and have FFmpeg stopped
early: the upload decoder reads the input's description at the head of its own
decode's output and stops a decode whose plan turns out wrong.

The process is always awaited, also when the caller is cancelled, so no zombie
is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import resource
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparrow.errors import EngineUnavailable
from sparrow.priority import nice_prefix

MEMORY_LIMIT_BYTES = 2 << 30
STDERR_LIMIT = 256 << 10
_READ_CHUNK = 64 << 10


class FFmpegTimeout(Exception):
    """FFmpeg ran past its deadline and was killed."""


class FFmpegNotFound(EngineUnavailable):
    """No FFmpeg binary could be run: a deployment problem (503), not bad input."""


@dataclass(frozen=True)
class FFmpegResult:
    returncode: int
    stderr: str
    """The first ``STDERR_LIMIT`` bytes of stderr, decoded leniently."""
    stdout: bytes = b""
    """What FFmpeg wrote to ``pipe:1``, when the caller asked for it."""
    stdout_overflow: bool = False
    """FFmpeg wrote more to ``pipe:1`` than the caller's limit."""
    stopped: bool = False
    """The caller's ``stop_when`` said stop, and FFmpeg was killed."""


def ffmpeg_exe(configured: str | None = None) -> str:
    """Path (or name) of the FFmpeg binary to run.

    ``configured`` wins when given; otherwise the first lookup of ``ffmpeg`` on
    ``PATH`` / the bundled binary is cached for the life of the process.
    """
    return configured or _default_ffmpeg()


@functools.cache
def _default_ffmpeg() -> str:
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - imageio-ffmpeg is a dependency
        raise FFmpegNotFound("FFmpeg not found: install it or imageio-ffmpeg") from exc
    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def _capped(kind: int, wanted: int) -> tuple[int, int]:
    # An unprivileged process may lower but never raise its hard limit.
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    return wanted, wanted


def _decoder_env() -> dict[str, str]:
    # A minimal environment for a process that reads hostile input. glibc reserves
    # 64 MiB of address space per malloc arena, up to 8 per core: without a cap,
    # thread count alone can hit the memory limit. LC_ALL=C keeps the messages
    # that probing parses in one language.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MALLOC_ARENA_MAX": "2", "LC_ALL": "C"}


def _limited(
    argv: Sequence[str], *, memory_bytes: int, cpu_s: int, background: bool = False
) -> list[str]:
    """``argv`` run under ``sh``'s ulimit: limits set in the child without ``preexec_fn``.

    ``preexec_fn`` is unsafe in a threaded process (aiosqlite and the thread pool
    run here) and forces a full fork; ``sh -c 'ulimit …; exec'`` needs neither.
    """
    memory_kib = _capped(resource.RLIMIT_AS, memory_bytes)[0] // 1024
    cpu = _capped(resource.RLIMIT_CPU, cpu_s)[0]
    # A decoder killed by a limit must not leave core files behind.
    script = f'ulimit -c 0 && ulimit -t {cpu} && ulimit -v {memory_kib} && exec "$0" "$@"'
    lowered = nice_prefix() if background else []
    return ["/bin/sh", "-c", script, *lowered, *_dies_with_the_server(), *argv]


@functools.cache
def _dies_with_the_server() -> list[str]:
    """``setpriv --pdeathsig KILL`` where util-linux has it: FFmpeg is killed when the
    server's process dies, even by SIGKILL, rather than decoding on as an orphan."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


async def run_ffmpeg(
    args: Sequence[str],
    *,
    deadline: float,
    memory_bytes: int = MEMORY_LIMIT_BYTES,
    ffmpeg: str | None = None,
    stdout_limit: int | None = None,
    stop_when: Callable[[bytes], bool] | None = None,
    background: bool = False,
) -> FFmpegResult:
    """Run ``ffmpeg *args`` with stdin closed; collect (capped) stderr.

    ``deadline`` is in ``loop.time()`` units. Raises ``FFmpegTimeout`` past it
    and ``FFmpegNotFound`` when the binary cannot be started. A non-zero exit is
    not an error here: callers read ``returncode`` and ``stderr``. With
    ``stdout_limit``, what FFmpeg writes to ``pipe:1`` is kept, up to that many
    bytes (``stdout_overflow`` says whether there was more); otherwise stdout is closed.
    ``stop_when`` is shown each piece of stderr as it arrives; once it answers True,
    FFmpeg is killed and the result says ``stopped``. ``background``: FFmpeg runs at
    the lowest CPU priority (``sparrow.priority``).
    """
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise FFmpegTimeout
    # The wall-clock kill is what bounds time; the CPU limit is a backstop should
    # the kill be missed, loose enough for FFmpeg's few pipeline threads.
    cpu_s = math.ceil(2 * remaining) + 1
    exe = shutil.which(ffmpeg_exe(ffmpeg))
    if exe is None:
        raise FFmpegNotFound(f"FFmpeg is not available: {_name(ffmpeg)} cannot be run.")
    try:
        proc = await asyncio.create_subprocess_exec(
            *_limited([exe, *args], memory_bytes=memory_bytes, cpu_s=cpu_s, background=background),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL if stdout_limit is None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_decoder_env(),
        )
    except OSError as exc:
        raise FFmpegNotFound(
            f"FFmpeg is not available: {_name(ffmpeg)} cannot be run ({exc.strerror})."
        ) from exc
    try:
        stderr, stdout, overflow, stopped = await asyncio.wait_for(
            _collect(proc, stdout_limit or 0, stop_when), timeout=deadline - loop.time()
        )
    except TimeoutError:
        raise FFmpegTimeout from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Shielded so that a second cancellation cannot leave a zombie behind.
            await asyncio.shield(proc.wait())
    assert proc.returncode is not None
    return FFmpegResult(
        proc.returncode, stderr.decode("utf-8", errors="replace"), stdout, overflow, stopped
    )


def _name(ffmpeg: str | None) -> str:
    # Error details never show a server path: the binary's name is enough.
    return Path(ffmpeg_exe(ffmpeg)).name


async def _drain(
    stream: asyncio.StreamReader | None,
    limit: int,
    on_chunk: Callable[[bytes], None] | None = None,
) -> tuple[bytes, bool]:
    """Read ``stream`` to its end, keeping its first ``limit`` bytes; (kept, more was read)."""
    kept = bytearray()
    overflow = False
    if stream is None:
        return b"", False
    while chunk := await stream.read(_READ_CHUNK):
        if on_chunk is not None:
            on_chunk(chunk)
        room = limit - len(kept)
        overflow = overflow or len(chunk) > room
        if room > 0:
            kept += chunk[:room]
    return bytes(kept), overflow


async def _collect(
    proc: asyncio.subprocess.Process,
    stdout_limit: int,
    stop_when: Callable[[bytes], bool] | None,
) -> tuple[bytes, bytes, bool, bool]:
    stopped = False

    def watch(chunk: bytes) -> None:
        nonlocal stopped
        if not stopped and stop_when is not None and stop_when(chunk):
            stopped = True
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # its pipes close: the draining below ends

    # Both pipes drained together: a full one would stall FFmpeg.
    (stderr, _), (stdout, overflow) = await asyncio.gather(
        _drain(proc.stderr, STDERR_LIMIT, watch), _drain(proc.stdout, stdout_limit)
    )
    await proc.wait()
    return stderr, stdout, overflow, stopped
