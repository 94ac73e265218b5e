"""Publishing a file so that readers see all of it or nothing.

The bytes go to a hidden temporary name in the destination's folder (same
filesystem, so the rename is atomic), are fsynced, renamed over the final name
with ``os.replace``, and the folder is fsynced so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path_for(dst: Path) -> Path:
    """A fresh hidden name next to ``dst``: ``.<name>.<random>.tmp``."""
    return dst.with_name(f".{dst.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) contents to stable storage."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, dst: Path) -> None:
    """fsync ``tmp``, rename it to ``dst`` (replacing it) and fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


@contextlib.contextmanager
def removing_on_error(tmp: Path) -> Iterator[Path]:
    """Yield ``tmp``; delete it if the block raises (cancellation included)."""
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
