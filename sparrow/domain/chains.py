"""Chains, their nodes and the spine rules (SPEC §1).

``ChainService`` is what the routes call: it checks the rules, asks the store
to change rows, and keeps the files on disk in step with them.
"""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path

import anyio

from sparrow.audio import decode_upload
from sparrow.audio.integrity import MissingAudio, OpenedFile
from sparrow.audio.storage import storing
from sparrow.domain.uploads import UploadSlots
from sparrow.errors import Conflict, InvalidInput, NotFound
from sparrow.events import ChainDeleted, NodesDeleted, SpineChanged
from sparrow.jobs import JobQueue
from sparrow.media import MediaStore
from sparrow.models import (
    Caller,
    Chain,
    Node,
    NodeKind,
    NodeStatus,
    Spine,
    new_id,
    utc_now,
)
from sparrow.settings import Settings
from sparrow.store import ChainStore

TITLE_MAX = 200
DEFAULT_SAMPLES_PER_PIXEL = 256  # audiowaveform's default zoom
MAX_PEAK_VALUES = 1_000_000  # pixels × channels in one peaks answer


class ChainService:
    def __init__(
        self,
        store: ChainStore,
        media: MediaStore,
        settings: Settings,
        *,
        jobs: JobQueue,
        uploads: UploadSlots | None = None,
    ) -> None:
        """``jobs`` is told the ids of deleted nodes, so that work on them stops."""
        self.store = store
        self.media = media
        self.settings = settings
        self.jobs = jobs
        self.uploads = uploads or UploadSlots(settings.max_concurrent_uploads)
        self._decode_slots = asyncio.Semaphore(settings.decode_concurrency)

    # -- chains ---------------------------------------------------------------

    def new_upload_path(self) -> Path:
        """Where an upload about to be received goes (503 if the disk has no room)."""
        return self.media.new_upload_path()

    async def create_from_upload(
        self, caller: Caller, upload: Path, *, title: str | None, filename: str | None
    ) -> tuple[Chain, Node]:
        """Decode an uploaded clip into a new chain whose root is that clip, ready."""
        chain_title = choose_title(title, filename)  # refused before any decoding work
        chain_id, node_id = new_id(), new_id()
        dst = self.media.node_audio(chain_id, node_id)
        try:
            with storing("saving the upload"):
                self.media.make_chain_dir(chain_id)
            async with self._decode_slots:
                decoded = await decode_upload(
                    upload,
                    dst,
                    max_duration_s=self.settings.max_upload_s,
                    timeout_s=self.settings.decode_timeout_s,
                    ffmpeg=self.settings.ffmpeg,
                )
            info = decoded.info
            self.media.check.remember(dst, info.sha256)  # its first download needs no hash
            now = utc_now()
            root = Node(
                id=node_id,
                chain_id=chain_id,
                parent_id=None,
                kind=NodeKind.UPLOAD,
                status=NodeStatus.READY,
                committed=True,
                duration_s=info.duration_s,
                sample_rate=info.sample_rate,
                channels=info.channels,
                frames=info.frames,
                audio_sha256=info.sha256,
                created_at=now,
                updated_at=now,
            )
            chain = Chain(
                id=chain_id,
                title=chain_title,
                root_node_id=node_id,
                created_at=now,
                updated_at=now,
                owner=caller.owner,
            )
            async with self.store.write() as w:
                await w.create_chain(chain, root)
        except BaseException:
            self.media.remove_chain(chain_id)
            raise
        return chain, root

    async def get_chain(self, caller: Caller, chain_id: str) -> Chain:
        return found_chain(chain_id, await self.store.get_chain(chain_id, owner=caller.owner))

    async def chain_with_nodes(self, caller: Caller, chain_id: str) -> tuple[Chain, list[Node]]:
        chain = await self.get_chain(caller, chain_id)
        return chain, await self.store.list_nodes(chain_id)

    async def list_chains(
        self, caller: Caller, *, limit: int, offset: int
    ) -> tuple[list[Chain], int]:
        return await self.store.list_chains(owner=caller.owner, limit=limit, offset=offset)

    async def rename(self, caller: Caller, chain_id: str, title: str) -> Chain:
        new_title = given_title(title)
        async with self.store.write() as w:
            found_chain(chain_id, await w.get_chain(chain_id, owner=caller.owner))
            chain = await w.rename_chain(chain_id, new_title)
        return found_chain(chain_id, chain)

    async def delete(self, caller: Caller, chain_id: str) -> None:
        """Delete the chain, its nodes, files, events and jobs; its streams end."""
        async with self.store.write() as w:
            found_chain(chain_id, await w.get_chain(chain_id, owner=caller.owner))
            # Emitted first (the log goes with the chain), published once deleted.
            await w.emit(ChainDeleted(chain_id))
            node_ids = await w.delete_chain(chain_id) or []
        self.jobs.forget(node_ids)
        await anyio.to_thread.run_sync(self.media.remove_chain, chain_id)

    # -- nodes and the spine ------------------------------------------------------

    async def get_node(self, caller: Caller, node_id: str) -> Node:
        return found_node(node_id, await self.store.get_node(node_id, owner=caller.owner))

    async def spine(self, caller: Caller, chain_id: str) -> Spine:
        await self.get_chain(caller, chain_id)
        return Spine.of(await self.store.spine(chain_id))

    # Each rule is checked inside the write transaction that acts on it, so no
    # other write (a discard racing a commit) can slip between check and act.

    async def commit(self, caller: Caller, node_id: str) -> Spine:
        """Commit the node and its ancestors; other committed branches are uncommitted."""
        async with self.store.write() as w:
            node = found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            if node.status is not NodeStatus.READY:
                raise Conflict(
                    f"Node {shown(node_id)} is {node.status}; only a ready node can be committed."
                )
            committed, uncommitted = await w.commit_path(node.id, node.chain_id)
            if committed or uncommitted:
                await w.emit(SpineChanged(node.chain_id, tuple(committed), tuple(uncommitted)))
        return Spine.of(await self.store.spine(node.chain_id))

    async def uncommit(self, caller: Caller, node_id: str) -> Spine:
        """Uncommit the node and its committed descendants."""
        async with self.store.write() as w:
            node = found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            if node.is_root:
                raise Conflict("The root node is always committed.")
            if uncommitted := await w.uncommit_subtree(node.id, node.chain_id):
                await w.emit(SpineChanged(node.chain_id, (), tuple(uncommitted)))
        return Spine.of(await self.store.spine(node.chain_id))

    async def discard(self, caller: Caller, node_id: str) -> list[str]:
        """Delete the node, its subtree and their files; returns the deleted ids."""
        async with self.store.write() as w:
            node = found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            if node.is_root:
                raise Conflict("The root node cannot be discarded; delete the chain instead.")
            if node.committed:
                raise Conflict(
                    f"Node {shown(node_id)} is on the spine; uncommit it before discarding it."
                )
            deleted = await w.delete_subtree(node.id, node.chain_id)
            await w.emit(NodesDeleted(node.chain_id, tuple(deleted)))
        self.jobs.forget(deleted)
        await anyio.to_thread.run_sync(self.media.remove_nodes, node.chain_id, deleted)
        return deleted

    async def audio_file(self, caller: Caller, node_id: str) -> tuple[Node, OpenedFile]:
        """The canonical WAV of a ready node, open and checked against what was recorded
        about it; the caller serves it from that handle and closes it."""
        node = await self.get_node(caller, node_id)
        if node.status is not NodeStatus.READY:
            raise Conflict(f"Node {shown(node_id)} has no audio: {_WHY_NO_AUDIO[node.status]}.")
        try:
            opened = await self.media.open_node_audio(node)
        except MissingAudio:
            # Deleted with its row between the read and now (a discard racing a download)?
            if await self.store.get_node(node_id, owner=caller.owner) is None:
                raise NotFound(f"There is no node {shown(node_id)}.") from None
            raise
        return node, opened

    async def peaks_source(
        self,
        caller: Caller,
        node_id: str,
        *,
        pixels_per_second: int | None,
        samples_per_pixel: int | None,
        split_channels: bool,
    ) -> tuple[Node, OpenedFile, int]:
        """The ready node, its file (open, as ``audio_file``), and the samples per pixel of
        the asked-for zoom."""
        node, opened = await self.audio_file(caller, node_id)
        try:
            if not node.sample_rate or node.frames is None or not node.channels:
                raise RuntimeError(f"ready node {node.id} lacks its audio facts")  # a bug
            spp = samples_per_pixel_for(
                node.sample_rate,
                node.frames,
                node.channels,
                pixels_per_second=pixels_per_second,
                samples_per_pixel=samples_per_pixel,
                split_channels=split_channels,
            )
            return node, opened, spp
        except BaseException:
            opened.close()
            raise

    async def sweep_orphans(self, *, older_than_s: float = 0.0) -> int:
        """Remove the files no row accounts for (see ``MediaStore.sweep``)."""
        return self.media.sweep(
            await self.store.all_chain_ids(),
            await self.store.ids_with_audio(),
            await self.store.ids_with_stems(),
            older_than_s=older_than_s,
        )


def samples_per_pixel_for(
    sample_rate: int,
    frames: int,
    channels: int,
    *,
    pixels_per_second: int | None,
    samples_per_pixel: int | None,
    split_channels: bool,
) -> int:
    """The zoom asked for over audio of that shape, in samples per pixel; InvalidInput for
    both ways of asking at once, or past ``MAX_PEAK_VALUES``."""
    if pixels_per_second is not None and samples_per_pixel is not None:
        raise InvalidInput("Give pixels_per_second or samples_per_pixel, not both.")
    if pixels_per_second is not None:
        # As audiowaveform computes it: whole samples per pixel, rounded down.
        spp = max(2, sample_rate // pixels_per_second)
    else:
        spp = samples_per_pixel or DEFAULT_SAMPLES_PER_PIXEL
    series = channels if split_channels else 1
    if -(-frames // spp) * series > MAX_PEAK_VALUES:
        raise InvalidInput(
            f"That zoom gives more than {MAX_PEAK_VALUES} peaks; use fewer pixels per second."
        )
    return spp


_WHY_NO_AUDIO = {
    NodeStatus.QUEUED: "it is queued; audio exists once it is ready",
    NodeStatus.GENERATING: "it is still generating; audio exists once it is ready",
    NodeStatus.ERROR: "its generation failed",
    NodeStatus.CANCELLED: "its generation was cancelled",
}


async def remove_files_if_deleted(store: ChainStore, media: MediaStore, chain_id: str) -> bool:
    """Whether the chain is gone; if it is, its folders are removed: its delete may have
    cleaned up before a job or an export wrote into them."""
    if await store.get_chain(chain_id) is not None:
        return False
    await anyio.to_thread.run_sync(media.remove_chain, chain_id)
    return True


def found_node(node_id: str, node: Node | None) -> Node:
    """The node, or NotFound naming the id that was asked for."""
    if node is None:
        raise NotFound(f"There is no node {shown(node_id)}.")
    return node


def found_chain(chain_id: str, chain: Chain | None) -> Chain:
    """The chain, or NotFound naming the id that was asked for."""
    if chain is None:
        raise NotFound(f"There is no chain {shown(chain_id)}.")
    return chain


def shown(some_id: str) -> str:
    """An id as error messages quote it: bounded, whatever a client sent."""
    return repr(some_id if len(some_id) <= 40 else some_id[:40] + "…")


TITLE_PATTERN = "[^\\s\\x00-\\x1f\\x7f-\\x9f]"
"""What a title must contain, as the OpenAPI document states it: one character that is
neither white space nor a control character, so that it is not blank once cleaned. (Lone
surrogates, which JSON can escape but UTF-8 cannot carry, are cleaned away too.)"""


def clean_title(title: str) -> str:
    """Control characters and lone surrogates become spaces; runs of white space collapse."""
    return " ".join("".join(" " if _unsafe(ch) else ch for ch in title).split())


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in {"Cc", "Cs"}


def given_title(title: str) -> str:
    """A title the client chose: refused when too long or blank, then cleaned."""
    if len(title) > TITLE_MAX:
        raise InvalidInput(f"The title is longer than {TITLE_MAX} characters.")
    cleaned = clean_title(title)
    if not cleaned:
        raise InvalidInput("The title is empty.")
    return cleaned


def choose_title(title: str | None, filename: str | None) -> str:
    """The given title, else the uploaded file's name without its extension."""
    if title is not None:
        return given_title(title)
    if filename:
        name = Path(filename.replace("\\", "/")).name
        stem = clean_title(name.rsplit(".", 1)[0] if "." in name[1:] else name)
        if stem:
            return stem[:TITLE_MAX]
    return "Untitled"
