"""Stems: a node's audio separated into drums, bass, other and vocals (a paid feature).

``request`` queues a separation (one job, on the same worker as generation) for
one node, ``request_spine`` for every node of the spine that has none yet. The
worker calls ``run``: it decodes each node's audio to the engine's format with
FFmpeg, hands the engine that array, writes each stem atomically and only then
marks the stems ``ready``. Every change is guarded by the stems lifecycle, so
stems cancelled or deleted meanwhile stay as the user left them.

Stems are written at the engine's rate and layout (Demucs: 44.1 kHz stereo).
Each holds exactly ``round(frames · R / rate)`` frames: the node's duration on
the engine's sample grid, so the stems line up sample for sample with the mix.

The tier is checked when the job is asked for and again when it runs: a key
downgraded or revoked in between gets ``payment_required`` on its stems. In a
job of several nodes, one node's failure fails that node; an engine that cannot
load, a cancel or a shutdown ends them all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import anyio
import numpy as np

from sparrow.audio import write_wav
from sparrow.audio.integrity import MissingAudio, OpenedFile
from sparrow.audio.segments import Segment
from sparrow.audio.tail import read_tail
from sparrow.domain.chains import found_chain, found_node, remove_files_if_deleted, shown
from sparrow.domain.keys import KeyService
from sparrow.domain.progress import PROGRESS_WAIT_S, ProgressReporter
from sparrow.domain.queue import QueueLimits
from sparrow.engines import STEM_NAMES, Audio, Cancelled, StemEngine
from sparrow.errors import (
    Conflict,
    EngineUnavailable,
    NotFound,
    PaymentRequired,
    SparrowError,
    StorageUnavailable,
)
from sparrow.events import StemsProgress, StemsStatusChanged
from sparrow.jobs import INTERRUPTED, JobControl, JobQueue, persistently, storage_error
from sparrow.media import MediaStore
from sparrow.models import (
    STEMS_ACTIVE,
    Caller,
    Job,
    JobKind,
    Node,
    NodeError,
    NodeStatus,
    Stems,
    StemsStatus,
    Tier,
    new_id,
    utc_now,
)
from sparrow.settings import Settings
from sparrow.store import ChainStore, ChainWriter

log = logging.getLogger(__name__)

PAYMENT_REQUIRED = NodeError(
    "payment_required", "Stems need a paid key; the key that asked for them is not one now."
)


@dataclass(frozen=True)
class StemsView:
    """A node's stems as a caller sees them: the row (None: never asked for) and progress."""

    node: Node
    stems: Stems | None
    progress: float | None = None


class StemsService:
    def __init__(
        self,
        store: ChainStore,
        media: MediaStore,
        engine: StemEngine,
        settings: Settings,
        *,
        keys: KeyService,
        limits: QueueLimits,
        jobs: JobQueue,
    ) -> None:
        self.store = store
        self.media = media
        self.engine = engine
        self.settings = settings
        self.keys = keys
        self.limits = limits
        self.jobs = jobs
        # Jobs run side by side (SPARROW_MAX_BATCH); their separations take turns.
        self._separating = asyncio.Lock()

    # -- requests ----------------------------------------------------------------------

    async def request(self, caller: Caller, node_id: str) -> tuple[StemsView, bool]:
        """Queue the separation of a ready node; returns its stems and whether a job was queued.

        Stems already ready, queued or separating are returned as they are.
        """
        async with self.store.write() as w:
            node = found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            _require_paid(caller)
            if node.status is not NodeStatus.READY:
                raise Conflict(
                    f"Node {shown(node_id)} is {node.status}; only a ready node has stems."
                )
            queued = await self._queue(w, caller, node.chain_id, [node])
        if queued:
            self.jobs.wake()
        return await self.view(caller, node_id), bool(queued)

    async def request_spine(self, caller: Caller, chain_id: str) -> tuple[list[StemsView], bool]:
        """Queue one job separating every spine node whose stems are not ready or on their way."""
        async with self.store.write() as w:
            found_chain(chain_id, await w.get_chain(chain_id, owner=caller.owner))
            _require_paid(caller)
            spine = await w.spine_nodes(chain_id)
            queued = await self._queue(w, caller, chain_id, spine)
        if queued:
            self.jobs.wake()
        return await self.spine_view(caller, chain_id), bool(queued)

    async def _queue(
        self, w: ChainWriter, caller: Caller, chain_id: str, nodes: list[Node]
    ) -> list[Stems]:
        todo = []
        for node in nodes:
            stems = await w.get_stems(node.id)
            if stems is None or stems.status not in (*STEMS_ACTIVE, StemsStatus.READY):
                todo.append(node)
        if not todo:
            return []
        await self.limits.check(w, caller)
        job = Job(
            id=new_id(),
            chain_id=chain_id,
            kind=JobKind.STEMS,
            request={"node_ids": [n.id for n in todo]},
            created_at=utc_now(),
            owner=caller.owner,
        )
        await self.jobs.enqueue(w, job)
        queued = []
        for node in todo:
            stems = await w.queue_stems(node.id, chain_id, job.id)
            await w.emit(StemsStatusChanged(chain_id, node.id, stems.status))
            queued.append(stems)
        return queued

    async def cancel(self, caller: Caller, node_id: str) -> StemsView:
        """Cancel a queued or running separation; cancelling cancelled stems changes nothing."""
        async with self.store.write() as w:
            found_node(node_id, await w.get_node(node_id, owner=caller.owner))
            _require_paid(caller)
            stems = await w.get_stems(node_id)
            if stems is None or stems.status not in (*STEMS_ACTIVE, StemsStatus.CANCELLED):
                state = "never asked for" if stems is None else stems.status
                raise Conflict(
                    f"The stems of node {shown(node_id)} are {state}; there is nothing to cancel."
                )
            if stems.status is not StemsStatus.CANCELLED:
                await self._set(w, node_id, StemsStatus.CANCELLED)
        self.jobs.forget([node_id])
        return await self.view(caller, node_id)

    async def view(self, caller: Caller, node_id: str) -> StemsView:
        node = found_node(node_id, await self.store.get_node(node_id, owner=caller.owner))
        _require_paid(caller)
        stems = await self.store.get_stems(node_id)
        return self._view(node, stems, await self._elsewhere(node.chain_id, [stems]))

    async def spine_view(self, caller: Caller, chain_id: str) -> list[StemsView]:
        found_chain(chain_id, await self.store.get_chain(chain_id, owner=caller.owner))
        _require_paid(caller)
        spine = await self.store.spine(chain_id)
        stems = await self.store.stems_of([n.id for n in spine])
        elsewhere = await self._elsewhere(chain_id, list(stems.values()))
        return [self._view(node, stems.get(node.id), elsewhere) for node in spine]

    def _view(
        self, node: Node, stems: Stems | None, elsewhere: dict[str, float] | None = None
    ) -> StemsView:
        """``elsewhere``: progress by node of separations another process runs (a cluster's
        worker), as their last progress events said."""
        progress = None
        if stems is not None and stems.status is StemsStatus.READY:
            progress = 1.0
        elif stems is not None and stems.status is StemsStatus.SEPARATING:
            control = self.jobs.running.get(stems.job_id or "")
            if control is not None:
                progress = control.piece_progress.get(node.id, 0.0)
            elif elsewhere is not None:
                progress = elsewhere.get(node.id, 0.0)
        return StemsView(node, stems, progress)

    async def _elsewhere(self, chain_id: str, stems: list[Stems | None]) -> dict[str, float] | None:
        """The progress of separations this process does not run, read from the log."""
        remote = [
            s
            for s in stems
            if s is not None
            and s.status is StemsStatus.SEPARATING
            and (s.job_id or "") not in self.jobs.running
        ]
        if not remote:
            return None
        return await self.store.last_progress(chain_id, StemsProgress.name)

    async def stem_file(self, caller: Caller, node_id: str, stem: str) -> tuple[Stems, OpenedFile]:
        """One ready stem's WAV, open and checked; the caller serves it and closes it."""
        view = await self.view(caller, node_id)
        stems = view.stems
        if stems is None or stems.status is not StemsStatus.READY or not stems.files:
            state = "never asked for" if stems is None else stems.status
            raise Conflict(f"The stems of node {shown(node_id)} are {state}, not ready.")
        if stem not in stems.files:
            raise NotFound(f"There is no stem {stem!r} of node {shown(node_id)}.")
        try:
            return stems, await self.media.open_stem(stems, stem)
        except MissingAudio:
            # Deleted with its node between the read and now (a discard racing a download)?
            if await self.store.get_stems(node_id) is None:
                raise NotFound(f"There is no node {shown(node_id)}.") from None
            raise

    # -- the job ------------------------------------------------------------------------

    async def recover(
        self, w: ChainWriter, job_id: str | None = None, error: NodeError = INTERRUPTED
    ) -> int:
        """End the stems left queued or separating by one ended job, or (None) by the jobs
        that were running when the process died."""
        stranded = await w.stranded_stems(job_id)
        for node_id in stranded:
            await self._set(w, node_id, StemsStatus.ERROR, error=error)
        return len(stranded)

    async def run(self, job: Job, control: JobControl) -> None:
        """Separate the job's stems that are still queued (the worker's runner), and those
        still separating when an earlier attempt's worker died (they stay separating)."""
        async with self.store.write() as w:
            separating = [s.node_id for s in await w.job_stems(job.id, StemsStatus.SEPARATING)]
            resumed = set(separating)
            queued = separating + [s.node_id for s in await w.job_stems(job.id, StemsStatus.QUEUED)]
            # Known to the worker before any cancel can see them in this job.
            control.node_ids.update(queued)
        if not queued:
            return
        if await self.keys.tier_of(job.owner) is not Tier.PAID:
            await self._end(queued, StemsStatus.ERROR, PAYMENT_REQUIRED)
            return
        pending = list(queued)  # each stays queued until its turn
        try:
            await anyio.to_thread.run_sync(self.engine.load, abandon_on_cancel=True)
            for i, node_id in enumerate(queued):
                if control.cancel.is_set():
                    raise Cancelled
                started = node_id in resumed
                if not started:
                    async with self.store.write() as w:
                        started = await self._set(w, node_id, StemsStatus.SEPARATING) is not None
                if started:  # else cancelled or deleted while it waited
                    span = (i / len(queued), (i + 1) / len(queued))
                    try:
                        await self._separate(node_id, control, span)
                    except (Cancelled, EngineUnavailable):
                        raise  # the whole job stops
                    except Exception as exc:  # this node fails; the others go on
                        await self._end([node_id], StemsStatus.ERROR, _failure(job, exc))
                pending.remove(node_id)
        except Cancelled:
            if control.shutting_down and control.hand_back:
                return  # left as they are: the queue runs the job again elsewhere
            if control.shutting_down:
                await self._end(pending, StemsStatus.ERROR, INTERRUPTED)
            else:  # cancelled or deleted by the user, who has seen the new status
                await self._end(pending, StemsStatus.CANCELLED, None)
        except Exception as exc:
            await self._end(pending, StemsStatus.ERROR, _failure(job, exc))

    async def _separate(self, node_id: str, control: JobControl, span: tuple[float, float]) -> None:
        """Separate one node; a node no longer wanted is skipped (its status says why)."""
        node = await self.store.get_node(node_id)
        if node is None or node_id not in control.node_ids:
            return
        frames = self._frames_for(node)
        audio = await self._decode(node, frames)

        async def announce(fraction: float, eta_s: float | None) -> None:
            control.piece_progress[node_id] = fraction
            await self._progress(node, control, fraction, eta_s)

        reporter = ProgressReporter(
            control,
            asyncio.get_running_loop(),
            announce,
            wanted=lambda: node_id in control.node_ids,
            span=span,
        )
        try:
            async with self._separating:  # one separation at a time on the device
                stems = await anyio.to_thread.run_sync(
                    self.engine.separate, audio, reporter, abandon_on_cancel=True
                )
        except Cancelled:
            if control.cancel.is_set():
                raise  # the whole job stops
            return  # only this node was cancelled or deleted
        finally:
            await reporter.flush()
        await self._publish(node, {name: stems[name][:frames] for name in STEM_NAMES})

    def _frames_for(self, node: Node) -> int:
        if not node.frames or not node.sample_rate:
            raise RuntimeError(f"ready node {node.id} lacks its audio facts")  # a bug
        return max(1, round(node.frames * self.engine.sample_rate / node.sample_rate))

    async def _decode(self, node: Node, frames: int) -> Audio:
        """The node's audio at the engine's rate and layout, exactly ``frames`` long."""
        path = await self.media.checked_node_audio(node)
        duration_s = node.duration_s or 0.0
        audio = await read_tail(
            [Segment(path, node.frames or 0, node.sample_rate or 0, node.channels or 0)],
            duration_s + 1.0,  # more than all of it: nothing is cut
            sample_rate=self.engine.sample_rate,
            channels=self.engine.channels,
            ffmpeg=self.settings.ffmpeg,
            timeout_s=self.settings.decode_timeout_s,
        )
        # The resampler may end a few frames short of the rounded length.
        if len(audio) < frames:
            audio = np.pad(audio, ((0, frames - len(audio)), (0, 0)))
        return np.ascontiguousarray(audio[:frames])

    async def _publish(self, node: Node, stems: dict[str, Audio]) -> None:
        rate = self.engine.sample_rate
        folder = self.media.node_stems(node.chain_id, node.id)

        def write_all() -> dict[str, str]:
            self.media.require_room("the stems")
            self.media.make_node_stems_dir(node.chain_id, node.id)
            hashes = {}
            for name, audio in stems.items():
                path = folder / f"{name}.wav"
                hashes[name] = write_wav(path, np.asarray(audio), rate).sha256
                self.media.check.remember(path, hashes[name])
            return hashes

        try:
            files = await anyio.to_thread.run_sync(write_all)
        except FileNotFoundError:
            await remove_files_if_deleted(self.store, self.media, node.chain_id)
            return  # the chain was deleted meanwhile
        except (OSError, StorageUnavailable) as exc:
            log.error("cannot write the stems of node %s: %s", node.id, exc)
            self.media.remove_stems(node.chain_id, node.id)
            await self._end([node.id], StemsStatus.ERROR, storage_error(exc, "stems"))
            await remove_files_if_deleted(self.store, self.media, node.chain_id)
            return
        first = next(iter(stems.values()))
        facts = {
            "model": self.engine.info().model,
            "sample_rate": rate,
            "channels": int(first.shape[1]),
            "frames": int(first.shape[0]),
            "files": files,
        }

        async def mark_ready() -> Stems | None:
            async with self.store.write() as w:
                return await self._set(w, node.id, StemsStatus.READY, facts=facts)

        if await persistently(mark_ready, f"marking the stems of node {node.id} ready") is None:
            # Cancelled or deleted while its files were being written.
            self.media.remove_stems(node.chain_id, node.id)
            await remove_files_if_deleted(self.store, self.media, node.chain_id)

    async def _end(self, node_ids: list[str], status: StemsStatus, error: NodeError | None) -> None:
        """The stems' last status: written persistently, it never stays unwritten."""

        async def end() -> None:
            async with self.store.write() as w:
                for node_id in node_ids:
                    await self._set(w, node_id, status, error=error)

        await persistently(end, f"ending the stems of {len(node_ids)} node(s) {status}")

    async def _set(
        self,
        w: ChainWriter,
        node_id: str,
        status: StemsStatus,
        *,
        error: NodeError | None = None,
        facts: dict[str, object] | None = None,
    ) -> Stems | None:
        """Change a node's stems status and announce it, if the lifecycle allows it."""
        stems = await w.set_stems_status(node_id, status, error=error, facts=facts)
        if stems is not None:
            names = tuple(stems.files or ())
            await w.emit(
                StemsStatusChanged(stems.chain_id, node_id, stems.status, stems.error, names)
            )
        return stems

    async def _progress(
        self, node: Node, control: JobControl, fraction: float, eta_s: float | None
    ) -> None:
        if node.id not in control.node_ids:
            return
        try:
            async with self.store.write(wait_s=PROGRESS_WAIT_S) as w:
                await w.emit(StemsProgress(node.chain_id, node.id, fraction, eta_s))
        except Exception as exc:  # the chain is gone, the disk is busy: progress can wait
            log.debug("progress not recorded: %s", exc)


def _failure(job: Job, exc: Exception) -> NodeError:
    """What a failure records on the stems: a Sparrow error as it is, anything else logged."""
    if isinstance(exc, SparrowError):
        return NodeError(exc.code, exc.detail)
    log.error("stems job %s failed", job.id, exc_info=exc)
    return NodeError("separation_failed", f"Separation failed ({type(exc).__name__}).")


def _require_paid(caller: Caller) -> None:
    if not caller.paid:
        raise PaymentRequired("Stems are a paid feature: this key's tier is free.")
