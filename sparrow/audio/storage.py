"""The data dir's failures, in Sparrow's words.

A disk that fills up, a file system remounted read-only, a folder whose
permissions changed: the server's trouble, never the client's. ``storing(what)``
turns the ``OSError`` of a block into ``StorageUnavailable`` (503, with
``Retry-After``) with a sentence that names what could not be done and why, and
never a path: error details go to clients, and a client has no business knowing
where the server keeps its files. ``scrub_paths`` does the same for text that
came from elsewhere (FFmpeg's messages), and ``raise_if_storage_failed`` turns
such text into ``StorageUnavailable`` when it reports a failing disk rather than
a bad input.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sparrow.errors import StorageUnavailable

# How a disk or file system in trouble reads in a message (FFmpeg runs with LC_ALL=C).
_STORAGE_WORDS = tuple(
    os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
)
# An absolute path, bare or after FFmpeg's "file:" protocol, up to a space, quote or colon.
_PATH = re.compile(r"(?:file:)?(?<![\w.])/[^\s:'\"]+")


def storage_failure(exc: OSError, what: str) -> StorageUnavailable:
    """``StorageUnavailable`` for an ``OSError`` met while ``what`` ("saving the upload")."""
    reason = exc.strerror or type(exc).__name__
    return StorageUnavailable(
        f"The server could not store its data while {what} ({reason.lower()}); try again later."
    )


@contextmanager
def storing(what: str) -> Iterator[None]:
    """Run the block; its ``OSError`` becomes ``StorageUnavailable`` naming ``what``."""
    try:
        yield
    except OSError as exc:
        raise storage_failure(exc, what) from exc


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component."""
    return _PATH.sub(lambda m: m.group(0).rsplit("/", 1)[-1] or "/", text)


def raise_if_storage_failed(message: str, what: str) -> None:
    """``StorageUnavailable`` if FFmpeg's ``message`` (its stderr) reports a full,
    read-only or failing disk while it wrote ``what`` ("the export")."""
    if any(words in message for words in _STORAGE_WORDS):
        raise StorageUnavailable(
            f"The server could not write {what} (its disk is full or not writable); "
            "try again later."
        )
