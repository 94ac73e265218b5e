"""Exporting the spine (or one stem of it) as one audio file (SPEC §2, §6).

The files of the spine's nodes are joined by one FFmpeg process
(``sparrow.audio.join``): brought to one rate and layout, with equal-power
crossfades. An export is named by a key made of what decides its bytes (the
nodes, their audio hashes, the format and the crossfade), so the same spine
with the same options is served from the file already made; a changed spine
makes a new key. A chain keeps its few most recent exports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from sparrow.audio.integrity import OpenedFile, open_quietly
from sparrow.audio.join import MEDIA_TYPES, ExportFormat, join_segments, output_problem, plan_join
from sparrow.audio.segments import Segment
from sparrow.audio.storage import storage_failure
from sparrow.audio.wav import WavLayout, read_layout
from sparrow.domain.chains import found_chain, remove_files_if_deleted, shown
from sparrow.errors import Conflict, InvalidInput, NotFound, PaymentRequired, Unavailable
from sparrow.media import MediaStore
from sparrow.models import Caller, Chain, Node, StemsStatus, played
from sparrow.settings import Settings
from sparrow.store import ChainStore

log = logging.getLogger(__name__)

# Part of every export's key: bump it when the join itself changes (2: segments play
# up to where their child begins, and the key holds their frames).
JOIN_VERSION = 2
KEPT_PER_CHAIN = 8


@dataclass(frozen=True)
class Part:
    """One segment of an export: what identifies its audio, and the frames of its file
    that play."""

    node_id: str
    sha256: str
    segment: Segment


@dataclass(frozen=True)
class ExportFile:
    file: OpenedFile
    """The export, held open: the caller serves it from this handle and closes it."""
    media_type: str
    filename: str
    key: str


@dataclass(frozen=True)
class SpineAudio:
    export: ExportFile
    layout: WavLayout


class ExportService:
    def __init__(self, store: ChainStore, media: MediaStore, settings: Settings) -> None:
        self.store = store
        self.media = media
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.export_concurrency)
        self._making: dict[str, tuple[asyncio.Lock, int]] = {}  # key → (lock, requests)

    async def spine(
        self,
        caller: Caller,
        chain_id: str,
        *,
        format: ExportFormat,
        crossfade_ms: float,
        loudness_lufs: float | None = None,
    ) -> ExportFile:
        """The chain's spine as one file (``loudness_lufs``: at that integrated loudness,
        true peak at most −1 dBTP)."""
        chain = found_chain(chain_id, await self.store.get_chain(chain_id, owner=caller.owner))
        spine = await self.store.spine(chain_id)

        async def parts() -> list[Part]:
            path = played(spine)
            segments = await self.media.played_segments(path)
            return [
                Part(p.node.id, p.node.audio_sha256 or "", segment)
                for p, segment in zip(path, segments, strict=True)
            ]

        return await self._export(
            chain,
            spine,
            parts,
            "",
            format=format,
            crossfade_ms=crossfade_ms,
            loudness_lufs=loudness_lufs,
        )

    async def spine_audio(self, caller: Caller, chain_id: str) -> SpineAudio:
        """The spine as it plays, for a player: its WAV export end to end (no crossfade, so
        each node starts at its ``offset_s``), with the file's layout."""
        made = await self.spine(caller, chain_id, format="wav", crossfade_ms=0)
        try:
            layout = await anyio.to_thread.run_sync(read_layout, made.file.path)
        except BaseException:
            made.file.close()
            raise
        return SpineAudio(made, layout)

    async def spine_stem(
        self,
        caller: Caller,
        chain_id: str,
        stem: str,
        *,
        format: ExportFormat,
        crossfade_ms: float,
    ) -> ExportFile:
        """One stem of the whole spine as one file: every spine node's stems must be ready."""
        chain = found_chain(chain_id, await self.store.get_chain(chain_id, owner=caller.owner))
        if not caller.paid:
            raise PaymentRequired("Stems are a paid feature: this key's tier is free.")
        spine = await self.store.spine(chain_id)
        stems = await self.store.stems_of([n.id for n in spine])
        missing = [
            n.id
            for n in spine
            if (s := stems.get(n.id)) is None or s.status is not StemsStatus.READY or not s.files
        ]
        if missing:
            raise Conflict(
                f"{len(missing)} of the spine's {len(spine)} nodes have no ready stems "
                f"(first: {shown(missing[0])}); POST /api/chains/{chain_id}/stems first."
            )

        async def parts() -> list[Part]:
            path = played(spine)
            segments = await self.media.played_stems(path, stems, stem)
            return [
                Part(p.node.id, (stems[p.node.id].files or {}).get(stem, ""), segment)
                for p, segment in zip(path, segments, strict=True)
            ]

        return await self._export(
            chain, spine, parts, f" - {stem}", format=format, crossfade_ms=crossfade_ms
        )

    async def _export(
        self,
        chain: Chain,
        spine: list[Node],
        parts: Callable[[], Awaitable[list[Part]]],
        label: str,
        *,
        format: ExportFormat,
        crossfade_ms: float,
        loudness_lufs: float | None = None,
    ) -> ExportFile:
        """Make (or reuse) the export of ``spine``; ``parts`` checks and lists its files.

        Whatever fails while the chain is deleted or its spine changes is answered for
        what it is (404, 409), and nothing of a deleted chain stays on disk.
        """
        if not spine:
            raise Conflict(f"The spine of chain {shown(chain.id)} is empty: nothing to export.")
        total_s = sum(p.play_s for p in played(spine))
        if total_s > self.settings.max_export_s:
            raise InvalidInput(
                f"The spine is {total_s:.0f} s long; exports are limited to "
                f"{self.settings.max_export_s:.0f} s."
            )
        try:
            path = await self._make(chain, await parts(), format, crossfade_ms, loudness_lufs)
        except (Unavailable, OSError) as exc:
            await self._still_there(chain, spine)
            if isinstance(exc, OSError):
                raise storage_failure(exc, "writing the export") from exc
            raise
        await self._still_there(chain, [])
        opened = await anyio.to_thread.run_sync(open_quietly, path)
        if opened is None:  # pruned by newer exports of the chain meanwhile
            raise Conflict("The export was replaced by newer ones before it was sent; ask again.")
        return ExportFile(opened, MEDIA_TYPES[format], f"{chain.title}{label}.{format}", path.stem)

    async def _still_there(self, chain: Chain, spine: list[Node]) -> None:
        """NotFound if the chain was deleted meanwhile (its exports go too); Conflict if its
        spine is no longer ``spine`` (given non-empty)."""
        if await remove_files_if_deleted(self.store, self.media, chain.id):
            raise NotFound(f"There is no chain {shown(chain.id)}: it was deleted.")
        if spine and await self.store.spine_ids(chain.id) != [n.id for n in spine]:
            raise Conflict("The spine changed while it was being exported; export it again.")

    async def _make(
        self,
        chain: Chain,
        parts: list[Part],
        format: ExportFormat,
        crossfade_ms: float,
        loudness_lufs: float | None,
    ) -> Path:
        """The export's file, made unless a checked one is there; its name is its key."""
        key = _key(parts, format, crossfade_ms, loudness_lufs)
        folder = self.media.chain_exports(chain.id)
        dst = folder / f"{key}.{format}"
        paths = [p.segment for p in parts]
        lock, requests = self._making.get(key, (asyncio.Lock(), 0))
        self._making[key] = (lock, requests + 1)
        try:
            async with lock:  # one request makes it; the others wait and reuse it
                if await anyio.to_thread.run_sync(_reusable, paths, dst, format, crossfade_ms):
                    return dst
                async with self._slots:
                    await anyio.to_thread.run_sync(self.media.require_room, "the export")
                    await anyio.Path(folder).mkdir(exist_ok=True)
                    await join_segments(
                        paths,
                        dst,
                        format=format,
                        crossfade_ms=crossfade_ms,
                        loudness_lufs=loudness_lufs,
                        ffmpeg=self.settings.ffmpeg,
                        timeout_s=self.settings.export_timeout_s,
                    )
                await anyio.to_thread.run_sync(_prune, folder, dst)
        finally:
            # The lock goes only with its last request, so a waiter never races a newcomer.
            lock, requests = self._making[key]
            if requests == 1:
                del self._making[key]
            else:
                self._making[key] = (lock, requests - 1)
        return dst


def _reusable(paths: list[Segment], dst: Path, format: ExportFormat, crossfade_ms: float) -> bool:
    """Whether the export already made at ``dst`` can be served; one that fails its check
    (a file damaged since, or made by a faulty FFmpeg) is removed, to be made again."""
    if not dst.is_file():
        return False
    problem = output_problem(
        dst, plan_join(paths, format=format, crossfade_ms=crossfade_ms), format
    )
    if problem is None:
        return True
    log.error("export %s fails its check (%s); making it again", dst.name, problem)
    dst.unlink(missing_ok=True)
    return False


def _key(
    parts: list[Part], format: ExportFormat, crossfade_ms: float, loudness_lufs: float | None
) -> str:
    identity: list[object] = [
        JOIN_VERSION,
        format,
        crossfade_ms,
        [(p.node_id, p.sha256, p.segment.frames) for p in parts],
    ]
    if loudness_lufs is not None:  # appended, so the keys of earlier exports stay
        identity.append(loudness_lufs)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _prune(folder: Path, keep: Path) -> None:
    """Keep the chain's most recent exports only (the one just made among them)."""
    made = sorted(
        (f for f in folder.iterdir() if not f.name.startswith(".") and f != keep),
        key=lambda f: f.stat().st_mtime,
        reverse=True,
    )
    for old in made[KEPT_PER_CHAIN - 1 :]:
        old.unlink(missing_ok=True)
