"""Where audio files live on disk, and their cleanup.

Layout under the data dir::

    audio/<chain_id>/<node_id>.wav   one canonical file per ready node
    tmp/                              uploads being received (cleared at start-up)

Paths are built only from ids the database issued, never from client input.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from sparrow.domain.models import new_id

log = logging.getLogger(__name__)


class MediaStore:
    def __init__(self, data_dir: Path) -> None:
        self.audio_dir = data_dir / "audio"
        self.tmp_dir = data_dir / "tmp"

    def ensure(self) -> None:
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def chain_dir(self, chain_id: str) -> Path:
        return self.audio_dir / chain_id

    def make_chain_dir(self, chain_id: str) -> Path:
        """Create a chain's folder durably: its entry in ``audio/`` is fsynced too."""
        path = self.chain_dir(chain_id)
        path.mkdir(exist_ok=True)
        fd = os.open(self.audio_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def node_audio(self, chain_id: str, node_id: str) -> Path:
        return self.chain_dir(chain_id) / f"{node_id}.wav"

    def new_upload_path(self) -> Path:
        # No extension on purpose: the format is detected from the content alone.
        return self.tmp_dir / f"upload-{new_id()}"

    def remove_nodes(self, chain_id: str, node_ids: Iterable[str]) -> None:
        for node_id in node_ids:
            self.node_audio(chain_id, node_id).unlink(missing_ok=True)

    def remove_chain(self, chain_id: str) -> None:
        shutil.rmtree(self.chain_dir(chain_id), ignore_errors=True)

    def sweep(self, chain_ids: set[str], node_ids: set[str]) -> int:
        """Delete every file that is not the audio of a known chain's ready node.

        ``node_ids`` are the nodes that own a file (the ready ones): anything else
        was left by a crash between writing a file and recording it. Returns the
        number of files and folders removed.
        """
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            _remove(leftover)
            removed += 1
        for chain_dir in self.audio_dir.iterdir():
            if not chain_dir.is_dir() or chain_dir.name not in chain_ids:
                _remove(chain_dir)
                removed += 1
                continue
            for file in chain_dir.iterdir():
                if file.suffix != ".wav" or file.stem not in node_ids:
                    _remove(file)
                    removed += 1
        if removed:
            log.info("removed %d orphaned files at start-up", removed)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
