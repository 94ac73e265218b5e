"""Chains, their nodes and the spine rules (SPEC §1).

``ChainService`` is what the routes call: it checks the rules, asks the store
to change rows, and keeps the files on disk in step with them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio

from sparrow.audio import decode_upload
from sparrow.domain.models import (
    Chain,
    Node,
    NodeKind,
    NodeStatus,
    Spine,
    new_id,
    utc_now,
)
from sparrow.errors import Conflict, NotFound
from sparrow.media import MediaStore
from sparrow.settings import Settings
from sparrow.store import ChainStore

TITLE_MAX = 200


class ChainService:
    def __init__(self, store: ChainStore, media: MediaStore, settings: Settings) -> None:
        self.store = store
        self.media = media
        self.settings = settings
        self._decode_slots = asyncio.Semaphore(settings.decode_concurrency)

    # -- chains ---------------------------------------------------------------

    async def create_from_upload(
        self, upload: Path, *, title: str | None, filename: str | None
    ) -> tuple[Chain, Node]:
        """Decode an uploaded clip into a new chain whose root is that clip, ready."""
        chain_id, node_id = new_id(), new_id()
        dst = self.media.node_audio(chain_id, node_id)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with self._decode_slots:
                decoded = await decode_upload(
                    upload,
                    dst,
                    max_duration_s=self.settings.max_upload_s,
                    timeout_s=self.settings.decode_timeout_s,
                )
            info = decoded.info
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
                title=choose_title(title, filename),
                root_node_id=node_id,
                created_at=now,
                updated_at=now,
            )
            await self.store.create_chain(chain, root)
        except BaseException:
            self.media.remove_chain(chain_id)
            raise
        return chain, root

    async def get_chain(self, chain_id: str) -> Chain:
        chain = await self.store.get_chain(chain_id)
        if chain is None:
            raise NotFound(f"There is no chain {chain_id!r}.")
        return chain

    async def chain_with_nodes(self, chain_id: str) -> tuple[Chain, list[Node]]:
        chain = await self.get_chain(chain_id)
        return chain, await self.store.list_nodes(chain_id)

    async def list_chains(self, *, limit: int, offset: int) -> tuple[list[Chain], int]:
        return await self.store.list_chains(limit=limit, offset=offset)

    async def rename(self, chain_id: str, title: str) -> Chain:
        chain = await self.store.rename_chain(chain_id, clean_title(title))
        if chain is None:
            raise NotFound(f"There is no chain {chain_id!r}.")
        return chain

    async def delete(self, chain_id: str) -> None:
        if not await self.store.delete_chain(chain_id):
            raise NotFound(f"There is no chain {chain_id!r}.")
        await anyio.to_thread.run_sync(self.media.remove_chain, chain_id)

    # -- nodes and the spine ------------------------------------------------------

    async def get_node(self, node_id: str) -> Node:
        node = await self.store.get_node(node_id)
        if node is None:
            raise NotFound(f"There is no node {node_id!r}.")
        return node

    async def spine(self, chain_id: str) -> Spine:
        await self.get_chain(chain_id)
        return Spine.of(await self.store.spine(chain_id))

    async def commit(self, node_id: str) -> Spine:
        """Commit the node and its ancestors; other committed branches are uncommitted."""
        node = await self.get_node(node_id)
        if node.status is not NodeStatus.READY:
            raise Conflict(
                f"Node {node_id!r} is {node.status}; only a ready node can be committed."
            )
        await self.store.commit_path(node.id, node.chain_id)
        return Spine.of(await self.store.spine(node.chain_id))

    async def uncommit(self, node_id: str) -> Spine:
        """Uncommit the node and its committed descendants."""
        node = await self.get_node(node_id)
        if node.is_root:
            raise Conflict("The root node is always committed.")
        await self.store.uncommit_subtree(node.id, node.chain_id)
        return Spine.of(await self.store.spine(node.chain_id))

    async def discard(self, node_id: str) -> list[str]:
        """Delete the node, its subtree and their files; returns the deleted ids."""
        node = await self.get_node(node_id)
        if node.is_root:
            raise Conflict("The root node cannot be discarded; delete the chain instead.")
        if node.committed:
            raise Conflict(f"Node {node_id!r} is on the spine; uncommit it before discarding it.")
        deleted = await self.store.delete_subtree(node.id, node.chain_id)
        await anyio.to_thread.run_sync(self.media.remove_nodes, node.chain_id, deleted)
        return deleted

    async def audio_file(self, node_id: str) -> tuple[Node, Path]:
        """The canonical WAV of a ready node."""
        node = await self.get_node(node_id)
        if node.status is not NodeStatus.READY:
            raise Conflict(f"Node {node_id!r} is {node.status}; its audio exists once it is ready.")
        path = self.media.node_audio(node.chain_id, node.id)
        if not path.is_file():
            # Deleted between the row read and now (discard racing a download).
            raise NotFound(f"There is no node {node_id!r}.")
        return node, path

    async def sweep_orphans(self) -> int:
        return self.media.sweep(await self.store.all_chain_ids(), await self.store.all_node_ids())


def clean_title(title: str) -> str:
    cleaned = " ".join("".join(ch for ch in title if ch.isprintable()).split())
    return cleaned[:TITLE_MAX] or "Untitled"


def choose_title(title: str | None, filename: str | None) -> str:
    """The given title, else the uploaded file's name without its extension."""
    if title and title.strip():
        return clean_title(title)
    if filename:
        name = Path(filename.replace("\\", "/")).name
        return clean_title(name.rsplit(".", 1)[0] if "." in name[1:] else name)
    return "Untitled"
