"""Branching: continuation nodes from a request, and the job that generates them.

``branch`` validates a request once into rows (nodes ``queued``, one job) in one
transaction, with the events that announce them; the worker later calls
``run`` with that job. ``run`` moves the nodes to ``generating``, reads the end
of the path root→parent they continue, and submits each sibling as one row to
the ``Batcher``, where it decodes beside the rows of any other jobs running
(SPEC §5). Each row's audio is matched to the context's loudness and written
atomically as soon as that row is done, and only then is its node marked
``ready``; a row cancelled or failed ends its own node only. Every outcome is a status
change guarded by the lifecycle, so a node cancelled or discarded meanwhile
stays as the user left it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import numpy as np

from sparrow.audio import AudioInfo, loudness, write_wav
from sparrow.audio.tail import read_tail
from sparrow.domain.chains import found_node, shown
from sparrow.domain.progress import PROGRESS_WAIT_S, Coalesced, ProgressReporter
from sparrow.domain.queue import QueueLimits
from sparrow.engines import Audio, Cancelled, Engine, Row
from sparrow.engines.batching import RowDecoder
from sparrow.errors import Conflict, InvalidInput, SparrowError, StorageUnavailable
from sparrow.events import NodeProgress, NodeStatusChanged
from sparrow.jobs import INTERRUPTED, JobControl, JobQueue, persistently, storage_error
from sparrow.media import MediaStore
from sparrow.models import (
    ACTIVE,
    Caller,
    Job,
    JobKind,
    Node,
    NodeError,
    NodeKind,
    NodeStatus,
    Sampling,
    new_id,
    played,
    utc_now,
)
from sparrow.settings import Settings
from sparrow.store import ChainStore, ChainWriter

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
MIN_BRANCH_S = 0.5

T = TypeVar("T")
_RowProgress = tuple[Node, JobControl, float, float | None]  # node, its job, fraction, eta_s


class _Once(Generic[T]):
    """A value computed once, from ``start()`` on, for every caller (a caller cancelled
    meanwhile does not cancel it for the others)."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._task: asyncio.Future[T] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._make())

    async def __call__(self) -> T:
        self.start()
        assert self._task is not None
        return await asyncio.shield(self._task)

    def close(self) -> None:
        """Stop it if nobody needs it any more; its failure, if any, was told to its callers."""
        if self._task is not None:
            self._task.cancel()
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())


@dataclass(frozen=True)
class BranchRequest:
    """A branch request as the API parsed it; ranges that depend on settings are checked here."""

    prompt: str = ""  # for every sibling, unless ``prompts`` gives one each
    count: int = 1
    prompts: tuple[str, ...] | None = None  # one per sibling; then count is their number
    seed: int | None = None
    from_s: float | None = None  # the point of the parent to continue from; None: its end
    sampling: Sampling = field(default_factory=Sampling)
    match_loudness: bool = True  # bring each continuation to its context's loudness

    def __post_init__(self) -> None:
        if self.prompts is not None and len(self.prompts) != self.count:
            raise ValueError(f"{len(self.prompts)} prompts for {self.count} siblings")

    def prompt_for(self, sibling: int) -> str:
        return self.prompt if self.prompts is None else self.prompts[sibling]


class GenerationService:
    def __init__(
        self,
        store: ChainStore,
        media: MediaStore,
        engine: Engine,
        settings: Settings,
        *,
        limits: QueueLimits,
        jobs: JobQueue,
        batcher: RowDecoder,
    ) -> None:
        """``batcher``: where this process's rows decode (one per engine)."""
        self.store = store
        self.media = media
        self.engine = engine
        self.settings = settings
        self.limits = limits
        self.jobs = jobs
        self.batcher = batcher
        # The rows of a batch report at the same step: their events share a transaction.
        self._progress: Coalesced[str, _RowProgress] = Coalesced(self._write_progress)

    # -- requests ----------------------------------------------------------------------

    async def branch(self, caller: Caller, parent_id: str, request: BranchRequest) -> list[Node]:
        """Queue one sibling continuation per prompt of a ready node; returns them, queued."""
        self._check_limits(request)
        if request.seed is not None:
            base_seed = request.seed
        else:  # every sibling's seed stays one a client may send back
            base_seed = secrets.randbelow(MAX_SEED - request.count + 2)
        async with self.store.write() as w:
            parent = found_node(parent_id, await w.get_node(parent_id, owner=caller.owner))
            if parent.status is not NodeStatus.READY:
                raise Conflict(
                    f"Node {shown(parent_id)} is {parent.status}; only a ready node can be "
                    "branched from."
                )
            from_s = self._from_s(parent, request.from_s)
            await self.limits.check(w, caller)
            job, nodes = self._rows_for(caller, parent, request, base_seed, from_s)
            await self.jobs.enqueue(w, job)
            await w.insert_nodes(nodes)
            for node in nodes:
                await w.emit(NodeStatusChanged(node.chain_id, node.id, node.status))
        self.jobs.wake()
        return nodes

    async def cancel(self, caller: Caller, node_id: str) -> Node:
        """Cancel a queued or generating node; cancelling a cancelled node changes nothing."""
        async with self.store.write() as w:
            node = found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            if node.status is NodeStatus.CANCELLED:
                return node
            if node.status not in ACTIVE:
                raise Conflict(
                    f"Node {shown(node_id)} is {node.status}; there is nothing to cancel."
                )
            cancelled = await self._set(w, node.id, NodeStatus.CANCELLED)
            assert cancelled is not None  # checked above, in the same transaction
        self.jobs.forget([node_id])
        return cancelled

    def _check_limits(self, request: BranchRequest) -> None:
        limits = self.settings
        if not MIN_BRANCH_S <= request.sampling.duration_s <= limits.max_branch_s:
            raise InvalidInput(
                f"duration_s must be between {MIN_BRANCH_S:g} and {limits.max_branch_s:g}."
            )
        if not 1 <= request.count <= limits.max_count:
            raise InvalidInput(f"count must be between 1 and {limits.max_count}.")
        if request.seed is not None and request.seed + request.count - 1 > MAX_SEED:
            raise InvalidInput(f"seed + count - 1 must not exceed {MAX_SEED}.")

    @staticmethod
    def _from_s(parent: Node, from_s: float | None) -> float:
        """Where the new nodes begin in the parent: ``from_s`` if it is within it."""
        end = parent.duration_s or 0.0
        if from_s is None:
            return end
        if not 0 < from_s <= end:  # also refuses NaN
            raise InvalidInput(
                f"from_s must be greater than 0 and at most the parent's duration ({end:g} s)."
            )
        return from_s

    def _rows_for(
        self, caller: Caller, parent: Node, request: BranchRequest, base_seed: int, from_s: float
    ) -> tuple[Job, list[Node]]:
        now = utc_now()
        job = Job(
            id=new_id(),
            chain_id=parent.chain_id,
            kind=JobKind.GENERATE,
            request={"parent_id": parent.id},
            created_at=now,
            owner=caller.owner,
        )
        info = self.engine.info()
        shared = request.sampling.to_json()
        nodes = [
            Node(
                id=new_id(),
                chain_id=parent.chain_id,
                parent_id=parent.id,
                kind=NodeKind.CONTINUATION,
                status=NodeStatus.QUEUED,
                committed=False,
                prompt=request.prompt_for(i),
                # Siblings get consecutive seeds: each node's audio depends on its seed only.
                params={
                    **shared,
                    "match_loudness": request.match_loudness,
                    "seed": base_seed + i,
                    "engine": info.engine,
                    "model": info.model,
                },
                job_id=job.id,
                from_s=from_s,
                created_at=now,
                updated_at=now,
            )
            for i in range(request.count)
        ]
        return job, nodes

    # -- the job ------------------------------------------------------------------------

    async def recover(
        self, w: ChainWriter, job_id: str | None = None, error: NodeError = INTERRUPTED
    ) -> int:
        """End the nodes left queued or generating by one ended job, or (None) by the jobs
        that were running when the process died."""
        stranded = await w.stranded_node_ids(job_id)
        for node_id in stranded:
            await self._set(w, node_id, NodeStatus.ERROR, error=error)
        return len(stranded)

    async def run(self, job: Job, control: JobControl) -> None:
        """Generate the job's nodes that are still queued (the worker's runner), and those
        still generating when an earlier attempt's worker died (they stay generating)."""
        async with self.store.write() as w:
            resumed = [
                node
                for node_id in await w.job_node_ids(job.id, NodeStatus.GENERATING)
                if (node := await w.get_node(node_id)) is not None
            ]
            started = resumed + [
                node
                for node_id in await w.job_node_ids(job.id, NodeStatus.QUEUED)
                if (node := await self._set(w, node_id, NodeStatus.GENERATING)) is not None
            ]
            # Known to the worker before any cancel can see these nodes generating.
            control.node_ids.update(n.id for n in started)
        if not started:
            return
        control.piece_progress.update((n.id, 0.0) for n in started)
        try:
            sampling = Sampling.from_json(started[0].params or {})
            await anyio.to_thread.run_sync(self.engine.load, abandon_on_cancel=True)
            context = await self._context(started[0], sampling.context_s)
        except Exception as exc:
            await self._failed(job, started, exc)
            return
        loudness_target = _Once(lambda: self._loudness_target(context))
        if any((node.params or {}).get("match_loudness") for node in started):
            loudness_target.start()  # measured while the rows decode
        try:
            await asyncio.gather(
                *(
                    self._run_row(job, control, node, context, sampling, loudness_target)
                    for node in started
                )
            )
        finally:
            loudness_target.close()

    async def _run_row(
        self,
        job: Job,
        control: JobControl,
        node: Node,
        context: Audio,
        sampling: Sampling,
        loudness_target: _Once[float | None],
    ) -> None:
        """One node as one row of the batcher: decoded beside any other rows, then brought
        to its context's loudness and published at once."""

        def wanted() -> bool:
            return node.id in control.node_ids and not control.cancel.is_set()

        reporter = ProgressReporter(
            control,
            asyncio.get_running_loop(),
            lambda fraction, eta_s: self._progress.announce(
                node.id, (node, control, fraction, eta_s)
            ),
            wanted=wanted,
            piece=node.id,
        )
        row = Row(context, node.prompt or "", int((node.params or {})["seed"]), sampling)
        try:
            try:
                # Abandoned only when the worker itself is cancelled (a shutdown past its grace).
                audio = await asyncio.wrap_future(
                    self.batcher.submit(
                        row,
                        reporter,
                        wanted=wanted,
                        owner=job.owner,
                        job_id=job.id,
                        node_id=node.id,
                    )
                )
            finally:
                await reporter.flush()
            if (node.params or {}).get("match_loudness"):  # nodes from before it: off
                target = await loudness_target()
                if target is not None:
                    audio = await self._match_loudness(audio, target)
        except Cancelled:
            if control.shutting_down and control.hand_back:
                return  # the node stays generating: the queue runs the job again elsewhere
            if control.shutting_down:
                await self._end([node], NodeStatus.ERROR, INTERRUPTED)
            else:  # cancelled by the user, who has already seen the node's new status
                await self._end([node], NodeStatus.CANCELLED, None)
            return
        except Exception as exc:
            await self._failed(job, [node], exc)
            return
        if node.id in control.node_ids:
            await self._publish_audio(node, audio)

    async def _failed(self, job: Job, nodes: list[Node], exc: Exception) -> None:
        """End the nodes with the error that stopped them."""
        if isinstance(exc, SparrowError):
            await self._end(nodes, NodeStatus.ERROR, NodeError(exc.code, exc.detail))
            return
        log.error("generation job %s failed", job.id, exc_info=exc)
        error = NodeError("generation_failed", f"Generation failed ({type(exc).__name__}).")
        await self._end(nodes, NodeStatus.ERROR, error)

    async def _loudness_target(self, context: Audio) -> float | None:
        """The loudness of the context (LUFS) the outputs are matched to; None when there is
        nothing to match (no context, or a silent one)."""
        if len(context) == 0:
            return None
        target = await anyio.to_thread.run_sync(loudness.estimate, context, self.engine.sample_rate)
        return None if target.silent else target.integrated_lufs

    async def _match_loudness(self, audio: Audio, target_lufs: float) -> Audio:
        """The output at ``target_lufs``, true peak at most -1 dBTP."""
        await anyio.to_thread.run_sync(self.media.require_room, "the generated audio")
        level, got = await loudness.match(
            audio,
            self.engine.sample_rate,
            target_lufs,
            folder=self.media.tmp_dir,
            ffmpeg=self.settings.ffmpeg,
            timeout_s=self.settings.decode_timeout_s,
        )
        log.debug("loudness %.1f LUFS for a context at %.1f", got.integrated_lufs, target_lufs)
        return level

    async def _context(self, node: Node, seconds: float) -> Audio:
        """The last ``seconds`` of the path root→parent as ``node`` continues it: the parent
        played up to the node's ``from_s``."""
        assert node.parent_id is not None  # a continuation
        path = played([*await self.store.path_to(node.parent_id), node])[:-1]
        return await read_tail(
            await self.media.played_segments(path),
            seconds,
            sample_rate=self.engine.sample_rate,
            channels=self.engine.channels,
            ffmpeg=self.settings.ffmpeg,
            timeout_s=self.settings.decode_timeout_s,
        )

    async def _publish_audio(self, node: Node, audio: Audio) -> None:
        """Write the node's file, then mark it ready; a file that cannot be written ends
        the node ``storage_unavailable``, and a ready write the storage refuses is retried
        until it goes through (``persistently``)."""
        path = self.media.node_audio(node.chain_id, node.id)

        def write() -> AudioInfo:
            self.media.require_room("the generated audio")
            written = write_wav(path, np.asarray(audio), self.engine.sample_rate)
            self.media.check.remember(path, written.sha256)
            return written

        try:
            info = await anyio.to_thread.run_sync(write)
        except FileNotFoundError:
            return  # the chain was deleted meanwhile
        except (OSError, StorageUnavailable) as exc:
            log.error("cannot write the audio of node %s: %s", node.id, exc)
            await self._end([node], NodeStatus.ERROR, storage_error(exc, "generated audio"))
            return
        facts = {
            "duration_s": info.duration_s,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "frames": info.frames,
            "audio_sha256": info.sha256,
        }

        async def mark_ready() -> Node | None:
            async with self.store.write() as w:
                return await self._set(w, node.id, NodeStatus.READY, audio=facts)

        if await persistently(mark_ready, f"marking node {node.id} ready") is None:
            path.unlink(missing_ok=True)  # cancelled or discarded while its file was written

    async def _end(self, nodes: list[Node], status: NodeStatus, error: NodeError | None) -> None:
        """The nodes' last status: written persistently, it never stays unwritten."""

        async def end() -> None:
            async with self.store.write() as w:
                for node in nodes:
                    await self._set(w, node.id, status, error=error)

        await persistently(end, f"ending {len(nodes)} node(s) {status}")

    async def _set(
        self,
        w: ChainWriter,
        node_id: str,
        status: NodeStatus,
        *,
        error: NodeError | None = None,
        audio: dict[str, Any] | None = None,
    ) -> Node | None:
        """Change a node's status and announce it, if the lifecycle allows the change."""
        node = await w.set_status(node_id, status, error=error, audio=audio)
        if node is not None:
            await w.emit(NodeStatusChanged(node.chain_id, node.id, node.status, node.error))
        return node

    async def _write_progress(self, rows: list[_RowProgress]) -> None:
        """Announce the progress of rows (of any jobs) whose nodes are still wanted, in one
        transaction."""
        try:
            async with self.store.write(wait_s=PROGRESS_WAIT_S) as w:
                for node, control, fraction, eta_s in rows:
                    if node.id in control.node_ids:
                        await w.emit(NodeProgress(node.chain_id, node.id, fraction, eta_s))
        except Exception as exc:  # the chain is gone, the disk is busy: progress can wait
            log.debug("progress not recorded: %s", exc)
