"""Is a stored WAV still the file the database recorded?

Files can change behind the server's back: truncated by a full disk or a bad
copy, overwritten, deleted. Before a file is served or used, ``FileCheck``
compares it with what was recorded when it was written:

- always (a header read and a ``stat``): a canonical WAV whose rate, channels
  and exact frame count are the recorded ones, and whose size is exactly its
  header plus those frames — a truncated or extended file fails here;
- its SHA-256, but only when it is cheap to need: the first time this process
  sees the file, and again whenever its size, mtime or inode changed since it
  last matched. An overwrite of the same length fails here.

A file to be served is checked once it is open (``OpenedFile``) and served
from that same open file, so a discard or a replacement between the check and
the last byte cannot turn a checked answer into a broken one: on Linux a file
unlinked while open stays readable to whoever holds it.

A file that fails is reported with ``DamagedAudio`` (a ``StorageUnavailable``:
503, the server's trouble) and logged; a missing file with ``MissingAudio``,
which a caller may tell apart from a file deleted with its row. A file that
failed is checked again next time, so one restored from a backup is served
again without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sparrow.audio.wav import WavFormatError, file_sha256, read_layout
from sparrow.errors import StorageUnavailable

log = logging.getLogger(__name__)

MAX_REMEMBERED = 100_000
_FDS = Path("/proc/self/fd")  # names for open files, readable even once unlinked


class DamagedAudio(StorageUnavailable):
    """A stored file no longer matches what the database recorded about it."""


class MissingAudio(StorageUnavailable):
    """A stored file the database records is not there."""


@dataclass(frozen=True)
class Recorded:
    """What the database recorded about a file when it was written."""

    sha256: str
    frames: int
    sample_rate: int
    channels: int


class OpenedFile:
    """A stored file held open. ``path`` names this very file (not whatever is at its
    name now) for code that opens by name: Starlette's responses, NumPy's memmap."""

    def __init__(self, path: Path) -> None:
        self.original = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.stat = os.fstat(self.fd)
        self._closed = False

    @property
    def path(self) -> Path:
        return _FDS / str(self.fd) if _FDS.is_dir() else self.original

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FileCheck:
    """Checks stored WAVs against their records, hashing only files that changed."""

    def __init__(self) -> None:
        self._matched: dict[Path, tuple[int, int, int, str]] = {}  # (size, mtime, inode, sha)
        self._lock = threading.Lock()  # checks run in worker threads

    def open(self, path: Path, recorded: Recorded, what: str) -> OpenedFile:
        """The file at ``path``, open and checked; ``DamagedAudio`` naming ``what`` ("the
        audio of node 'ab…'") unless it is the recorded file, ``MissingAudio`` if there is
        none. Blocking: run it in a thread."""
        try:
            opened = OpenedFile(path)
        except FileNotFoundError:
            log.error("stored file %s is missing", path)
            raise MissingAudio(
                f"The server's copy of {what} is missing; it cannot be used until it is restored."
            ) from None
        except OSError as exc:
            raise DamagedAudio(
                f"The server's copy of {what} cannot be read ({(exc.strerror or '').lower()})."
            ) from exc
        try:
            self._check(opened, recorded, what)
        except BaseException:
            opened.close()
            raise
        return opened

    def verify(self, path: Path, recorded: Recorded, what: str) -> None:
        """As ``open``, for a file read by name afterwards (by FFmpeg, say)."""
        self.open(path, recorded, what).close()

    def remember(self, path: Path, sha256: str) -> None:
        """``path`` was just written with this SHA-256: its first check need not hash it.
        Blocking (a ``stat``)."""
        stat = path.stat()
        self._remember(path, (stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256))

    def _check(self, opened: OpenedFile, recorded: Recorded, what: str) -> None:
        stat, path = opened.stat, opened.original
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino, recorded.sha256)
        with self._lock:
            if self._matched.get(path) == key:
                return
        problem = _header_problem(opened.path, stat.st_size, recorded)
        if problem is None and file_sha256(opened.path) != recorded.sha256:
            problem = "its content is not what was recorded (SHA-256 differs)"
        if problem is not None:
            with self._lock:
                self._matched.pop(path, None)
            log.error("stored file %s is damaged: %s", path, problem)
            raise DamagedAudio(
                f"The server's copy of {what} is damaged ({problem}); it cannot be used "
                "until it is restored."
            )
        self._remember(path, key)

    def _remember(self, path: Path, key: tuple[int, int, int, str]) -> None:
        with self._lock:
            if len(self._matched) >= MAX_REMEMBERED:
                self._matched.clear()
            self._matched[path] = key


def open_quietly(path: Path) -> OpenedFile | None:
    """``path`` held open, or None if there is no such file."""
    with contextlib.suppress(FileNotFoundError):
        return OpenedFile(path)
    return None


def _header_problem(path: Path, size: int, recorded: Recorded) -> str | None:
    try:
        layout = read_layout(path)
    except WavFormatError as exc:
        return f"it is not a readable WAV: {str(exc).split(': ', 1)[-1]}"
    except OSError as exc:
        return f"it cannot be read: {(exc.strerror or type(exc).__name__).lower()}"
    facts = (layout.frames, layout.sample_rate, layout.channels)
    wanted = (recorded.frames, recorded.sample_rate, recorded.channels)
    if facts != wanted:
        return (
            f"it holds {layout.frames} frames at {layout.sample_rate} Hz in {layout.channels} "
            f"channels, not the recorded {recorded.frames} at {recorded.sample_rate} Hz in "
            f"{recorded.channels}"
        )
    data = layout.frames * layout.block_align
    expected = layout.data_offset + data + (data & 1)
    if size != expected:
        return f"it is {size} bytes long, not the {expected} its header and frames call for"
    return None
