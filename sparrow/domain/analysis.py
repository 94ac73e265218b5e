"""The musical analysis of every ready node (SPEC §12): tempo, key, loudness, true peak.

One ``Analyser`` runs in each process that runs jobs (the embedded server, each
``sparrow worker``), never in an API replica: librosa's import and its numba
kernels stay out of the request path. It takes the oldest ready node without an
analysis (uploads and continuations alike; the nodes from before analysis
existed too), claims it (``sparrow.store.analysis``), measures it off the event
loop — loudness with FFmpeg's ``ebur128`` as exports are measured, tempo and key
with librosa in a process of its own (``sparrow.audio.analysis``), both at the lowest
CPU priority (``sparrow.priority``): nobody waits on it, and it must not slow the
rows still generating or the requests — and writes the analysis
with a ``node-analysis`` event in one transaction. It looks for work every
``POLL_S`` while idle, so a node is analysed within about that of being ready,
whichever process made it ready.

A node whose analysis fails (its file damaged, FFmpeg broken, the analysis process
killed) keeps a null analysis and is tried again once its claim is stale
(``CLAIM_S``); a killed process is replaced for the next node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from sparrow.audio import loudness
from sparrow.audio.analysis import analyse_file, warm
from sparrow.errors import EngineUnavailable, SparrowError
from sparrow.events import NodeAnalysed
from sparrow.heap import settle_heap
from sparrow.jobs import persistently
from sparrow.media import MediaStore
from sparrow.models import Node, iso_utc
from sparrow.priority import background
from sparrow.settings import Settings
from sparrow.store import ChainStore

log = logging.getLogger(__name__)

POLL_S = 0.5
CLAIM_S = 300.0  # a claim older than this is free again
FAILED_WAIT_S = 5.0  # after a failure, before the next node


def analysis_of(
    level: loudness.Loudness, tempo_bpm: float | None, key: str | None
) -> dict[str, Any]:
    """The analysis as nodes record it (SPEC §12), rounded to what the numbers mean."""

    def finite(value: float) -> float | None:
        return round(value, 2) if math.isfinite(value) else None

    return {
        "tempo_bpm": None if tempo_bpm is None else round(tempo_bpm, 2),
        "key": key,
        "loudness_lufs": None if level.silent else finite(level.integrated_lufs),
        "true_peak_dbtp": finite(level.true_peak_dbtp),
    }


async def analyse_audio(
    path: Path,
    *,
    ffmpeg: str | None = None,
    timeout_s: float = loudness.TIMEOUT_S,
    background: Executor | None = None,
) -> dict[str, Any]:
    """The analysis of the WAV at ``path``: FFmpeg's ebur128, then librosa in a thread;
    with ``background`` (a process at the lowest priority, where librosa runs) both
    run in the background."""
    level = await loudness.measure(
        path, ffmpeg=ffmpeg, timeout_s=timeout_s, background=background is not None
    )
    # Abandoned on shutdown: the thread only reads.
    if background is None:
        musical = await anyio.to_thread.run_sync(analyse_file, path, abandon_on_cancel=True)
    else:
        musical = await asyncio.get_running_loop().run_in_executor(background, analyse_file, path)
    return analysis_of(level, musical.tempo_bpm, musical.key)


class Analyser:
    def __init__(self, store: ChainStore, media: MediaStore, settings: Settings) -> None:
        self.store = store
        self.media = media
        self.settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.analysed = 0  # nodes, since start
        self.last_s: float | None = None  # seconds the last analysis took
        self._warmed: ProcessPoolExecutor | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sparrow-analyser")

    async def stop(self) -> None:
        """Stop at once: the running analysis is abandoned (its node is taken up again once
        its claim is stale). The flag ends the loop even where a cancellation is absorbed
        (a thread call that is shielded from it). The analysis process is the server's:
        it stays (``sparrow serve`` stops it as it ends)."""
        if self._task is None:
            return
        self._stopping.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _process(self) -> ProcessPoolExecutor:
        """The analysis process, librosa imported and its kernels compiled in it (seconds,
        once for the server, before the first node waits for them)."""
        pool = await background.pool()
        if pool is not self._warmed:
            await asyncio.get_running_loop().run_in_executor(pool, warm)
            self._warmed = pool
        return pool

    async def analyse(self, node: Node) -> dict[str, Any]:
        """The analysis of a ready node's audio."""
        path = await self.media.checked_node_audio(node)
        # A process that ended (the OOM killer, an operator) is replaced, and the node is
        # tried once more in the new one: it may have ended before this node came.
        for attempt in (1, 2):
            try:
                return await analyse_audio(
                    path,
                    ffmpeg=self.settings.ffmpeg,
                    timeout_s=self.settings.decode_timeout_s,
                    background=await self._process(),
                )
            except BrokenProcessPool:
                background.forget(kill=False)
                log.warning("the analysis process ended (attempt %d for node %s)", attempt, node.id)
        raise EngineUnavailable("The analysis process ended while analysing.")

    async def _run(self) -> None:
        try:
            await self._process()
        except BrokenProcessPool:  # a new one is started for the first node
            log.warning("the analysis process ended as it started")
            background.forget(kill=False)
        settle_heap()  # what the server holds now stays for good
        while not self._stopping.is_set():
            try:
                done = await self._next()
            except Exception:
                log.exception("node analysis failed; trying the next node")
                done = False
                await self._idle(FAILED_WAIT_S)
            if not done:
                await self._idle(POLL_S)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _next(self) -> bool:
        """Analyse one waiting node; False if none is waiting."""
        now = datetime.now(UTC)
        stale = iso_utc(now - timedelta(seconds=CLAIM_S))
        node_id = await self.store.next_unanalysed(stale)
        if node_id is None:
            return False
        async with self.store.write() as w:
            node = await w.claim_analysis(node_id, iso_utc(now), stale)
        if node is None:
            return True  # another analyser took it, or it went meanwhile
        started = time.monotonic()
        try:
            analysis = await self.analyse(node)
        except (SparrowError, OSError) as exc:  # damaged, deleted meanwhile, FFmpeg broken
            log.warning("node %s not analysed (tried again in %.0f s): %s", node.id, CLAIM_S, exc)
            return True

        async def record() -> None:
            async with self.store.write() as w:
                if await w.set_analysis(node.id, analysis) is not None:
                    await w.emit(NodeAnalysed(node.chain_id, node.id, analysis))

        await persistently(record, f"recording the analysis of node {node.id}")
        self.last_s = time.monotonic() - started
        self.analysed += 1
        log.debug("analysed node %s in %.2f s: %s", node.id, self.last_s, analysis)
        return True
