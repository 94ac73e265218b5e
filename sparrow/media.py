"""Where audio files live on disk, and their cleanup.

Layout under the data dir::

    audio/<chain_id>/<node_id>.wav            one canonical file per ready node
    stems/<chain_id>/<node_id>/<stem>.wav     a node's stems, once its separation is ready
    exports/<chain_id>/<key>.<ext>            exports made, reused while the spine is the same
    tmp/                                      uploads being received (cleared at start-up)

Paths are built only from ids the database issued (and stem names and export
keys the server chose), never from client input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import anyio

from sparrow.audio.atomic import fsync_path
from sparrow.audio.integrity import FileCheck, OpenedFile, Recorded
from sparrow.audio.segments import Segment
from sparrow.audio.storage import storing
from sparrow.errors import StorageUnavailable
from sparrow.models import Node, Played, Stems, new_id

log = logging.getLogger(__name__)

PROBE_BYTES = 64 << 10  # enough to need free blocks, not just a directory entry
MIN_FREE_BYTES = 64_000_000
_FEW = 32  # nodes removed one by one; more, and their folders are listed once


class MediaStore:
    """The data dir's files. New audio is refused (``require_room``) once the disk has less
    than ``min_free_bytes`` free, so that what is left (the database's reserve among it)
    goes to recording what happened, not to more audio."""

    def __init__(self, data_dir: Path, *, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.min_free_bytes = min_free_bytes
        self.audio_dir = data_dir / "audio"
        self.stems_dir = data_dir / "stems"
        self.exports_dir = data_dir / "exports"
        self.tmp_dir = data_dir / "tmp"
        self.check = FileCheck()

    def ensure(self) -> None:
        for folder in (self.audio_dir, self.stems_dir, self.exports_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def probe_write(self) -> str | None:
        """Whether the data dir takes a file now (a small one, written, fsynced and removed)
        and has room for new audio (``require_room``): None, or why not. Blocking."""
        probe = self.tmp_dir / f".probe-{new_id()}"
        try:
            with probe.open("wb") as f:
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            return f"The data dir does not take files ({(exc.strerror or str(exc)).lower()})."
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        try:
            self.require_room("new audio")
        except StorageUnavailable as exc:
            return exc.detail
        return None

    def require_room(self, what: str) -> None:
        """``StorageUnavailable`` if the data dir has less than ``min_free_bytes`` free.
        Blocking (a ``statvfs``)."""
        with storing(f"checking the room for {what}"):
            free = shutil.disk_usage(self.tmp_dir).free
        if free < self.min_free_bytes:
            raise StorageUnavailable(
                f"The server's disk is almost full ({free / 1e6:.1f} MB free, "
                f"{self.min_free_bytes / 1e6:g} MB needed): {what} cannot be stored now; "
                "try again later."
            )

    def chain_dir(self, chain_id: str) -> Path:
        return self.audio_dir / chain_id

    def make_chain_dir(self, chain_id: str) -> Path:
        """Create a chain's folder durably: its entry in ``audio/`` is fsynced too."""
        return _make_durable(self.chain_dir(chain_id))

    def node_audio(self, chain_id: str, node_id: str) -> Path:
        return self.chain_dir(chain_id) / f"{node_id}.wav"

    async def checked_node_audio(self, node: Node) -> Path:
        """A ready node's file, once checked against its record (``audio.integrity``):
        ``DamagedAudio`` or ``MissingAudio`` (503s) when it is not the file recorded. For
        readers that open it by name (FFmpeg); ``open_node_audio`` to serve it."""
        path, recorded, what = self._node_record(node)
        await anyio.to_thread.run_sync(self.check.verify, path, recorded, what)
        return path

    async def played_segments(self, path: Sequence[Played]) -> list[Segment]:
        """The checked files of a path's nodes (``checked_node_audio``), each cut where it
        stops playing."""
        return [
            Segment(
                await self.checked_node_audio(p.node),
                p.frames,
                p.node.sample_rate or 0,
                p.node.channels or 0,
            )
            for p in path
        ]

    async def played_stems(
        self, path: Sequence[Played], stems: Mapping[str, Stems], stem: str
    ) -> list[Segment]:
        """One stem of each of a path's nodes (``checked_stem``), each cut where its node stops
        playing (at the stem's own rate)."""
        segments = []
        for p in path:
            of_node = stems[p.node.id]
            rate = of_node.sample_rate or 0
            frames = min(of_node.frames or 0, round(p.play_s * rate))
            path_of = await self.checked_stem(of_node, stem)
            segments.append(Segment(path_of, frames, rate, of_node.channels or 0))
        return segments

    async def open_node_audio(self, node: Node) -> OpenedFile:
        """A ready node's file, open and checked (as ``checked_node_audio``): the caller
        serves it from this handle, and closes it."""
        return await anyio.to_thread.run_sync(self.check.open, *self._node_record(node))

    async def open_stem(self, stems: Stems, stem: str) -> OpenedFile:
        """One stem of ready stems, open and checked against its record."""
        return await anyio.to_thread.run_sync(self.check.open, *self._stem_record(stems, stem))

    async def checked_stem(self, stems: Stems, stem: str) -> Path:
        """One stem of ready stems, checked, for readers that open it by name."""
        path, recorded, what = self._stem_record(stems, stem)
        await anyio.to_thread.run_sync(self.check.verify, path, recorded, what)
        return path

    def _node_record(self, node: Node) -> tuple[Path, Recorded, str]:
        recorded = Recorded(
            node.audio_sha256 or "", node.frames or 0, node.sample_rate or 0, node.channels or 0
        )
        return self.node_audio(node.chain_id, node.id), recorded, f"the audio of node '{node.id}'"

    def _stem_record(self, stems: Stems, stem: str) -> tuple[Path, Recorded, str]:
        recorded = Recorded(
            (stems.files or {}).get(stem, ""),
            stems.frames or 0,
            stems.sample_rate or 0,
            stems.channels or 0,
        )
        path = self.stem_file(stems.chain_id, stems.node_id, stem)
        return path, recorded, f"the {stem} stem of node '{stems.node_id}'"

    def node_stems(self, chain_id: str, node_id: str) -> Path:
        return self.stems_dir / chain_id / node_id

    def make_node_stems_dir(self, chain_id: str, node_id: str) -> Path:
        _make_durable(self.stems_dir / chain_id)
        return _make_durable(self.node_stems(chain_id, node_id))

    def stem_file(self, chain_id: str, node_id: str, stem: str) -> Path:
        return self.node_stems(chain_id, node_id) / f"{stem}.wav"

    def chain_exports(self, chain_id: str) -> Path:
        return self.exports_dir / chain_id

    def new_upload_path(self) -> Path:
        """Where an upload about to be received goes, once the disk is known to have room."""
        self.require_room("an upload")
        # No extension on purpose: the format is detected from the content alone.
        return self.tmp_dir / f"upload-{new_id()}"

    def remove_nodes(self, chain_id: str, node_ids: Collection[str]) -> None:
        """Delete the files (audio and stems) of these nodes of the chain."""
        if len(node_ids) <= _FEW:
            for node_id in node_ids:
                self.node_audio(chain_id, node_id).unlink(missing_ok=True)
                self.remove_stems(chain_id, node_id)
            return
        # A deep subtree: one listing of each folder beats a failed call per node.
        gone = set(node_ids)
        for folder, suffix in ((self.chain_dir(chain_id), ".wav"), (self.stems_dir / chain_id, "")):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.removesuffix(suffix) in gone:
                    _remove_path(Path(entry.path))

    def remove_stems(self, chain_id: str, node_id: str) -> None:
        shutil.rmtree(self.node_stems(chain_id, node_id), ignore_errors=True)

    def remove_chain(self, chain_id: str) -> None:
        for folder in (self.chain_dir(chain_id), self.stems_dir / chain_id):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.chain_exports(chain_id), ignore_errors=True)

    def sweep(
        self,
        chain_ids: set[str],
        node_ids: set[str],
        stems_ids: set[str],
        *,
        older_than_s: float = 0.0,
    ) -> int:
        """Delete every file the database does not account for.

        ``older_than_s`` spares what changed more recently: where other processes share
        the data dir, a file may be written a moment before its row is.

        ``node_ids`` are the nodes that own an audio file (the ready ones) and
        ``stems_ids`` the nodes whose stems are ready: anything else was left by a
        crash between writing a file and recording it. Exports of known chains are
        kept (they are found again by their key); their temporary files and folders
        are not.
        Returns the number of files and folders removed.
        """
        cutoff = time.time() - older_than_s

        def _remove(path: Path) -> int:
            return _remove_path(path) if older_than_s <= 0 or _mtime(path) < cutoff else 0

        removed = 0
        for leftover in self.tmp_dir.iterdir():
            removed += _remove(leftover)
        for chain_dir in self.audio_dir.iterdir():
            if not chain_dir.is_dir() or chain_dir.name not in chain_ids:
                removed += _remove(chain_dir)
                continue
            for file in chain_dir.iterdir():
                if file.suffix != ".wav" or file.stem not in node_ids:
                    removed += _remove(file)
        for chain_dir in self.stems_dir.iterdir():
            if not chain_dir.is_dir() or chain_dir.name not in chain_ids:
                removed += _remove(chain_dir)
                continue
            for node_dir in chain_dir.iterdir():
                if node_dir.name not in stems_ids:
                    removed += _remove(node_dir)
                else:  # temporary files of a separation that was running
                    removed += sum(_remove(f) for f in node_dir.glob(".*"))
        for chain_dir in self.exports_dir.iterdir():
            if not chain_dir.is_dir() or chain_dir.name not in chain_ids:
                removed += _remove(chain_dir)
            else:
                removed += sum(_remove(f) for f in chain_dir.glob(".*"))
        if removed:
            log.info("removed %d orphaned files at start-up", removed)
        return removed


def _make_durable(path: Path) -> Path:
    """Create a folder and fsync its parent, so that the new entry survives a crash."""
    path.mkdir(exist_ok=True)
    fsync_path(path.parent)
    return path


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove_path(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return 1
