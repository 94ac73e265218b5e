"""Batching across requests: the ``Batcher`` decodes rows of many jobs as one batch.

Through both MusicGen loops on the tiny model (CPU): a row's audio is the same bytes
alone or beside rows with other prompts, contexts, durations and seeds, whether it
joined a batch already decoding (Sparrow's loop) or started with rows that fit
(transformers' generate); cancelling one row leaves the others running. With the
mock: rows are taken fairly across owners and jobs when more wait than fit; a batch
that fails fails its own rows only; an engine that cannot load fails every row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from helpers import ML_REASON

from sparrow.engines.base import Audio, Cancelled, Continuation, Row
from sparrow.engines.batching import Batcher
from sparrow.engines.mock import MockBatch, MockEngine
from sparrow.errors import EngineUnavailable, GenerationFailed
from sparrow.models import Sampling

WAIT_S = 60


def noise(seconds: float, seed: int, rate: int = 32_000) -> Audio:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal((round(seconds * rate), 1))).astype(np.float32)


class Seen:
    """A row's progress callback that records what it was told (and may cancel)."""

    def __init__(self, cancel_at: float | None = None) -> None:
        self.fractions: list[float] = []
        self.at: list[float] = []
        self.cancel_at = cancel_at

    def __call__(self, fraction: float) -> None:
        self.fractions.append(fraction)
        self.at.append(time.monotonic())
        if self.cancel_at is not None and fraction >= self.cancel_at:
            raise Cancelled


def wait(future: Future[Audio]) -> Audio:
    return future.result(timeout=WAIT_S)


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# -- the tiny MusicGen, both loops -----------------------------------------------------


@pytest.fixture(scope="module", params=["sparrow", "transformers"])
def musicgen(request: pytest.FixtureRequest, tiny_models: Any) -> Any:
    pytest.importorskip("torch", reason=ML_REASON)
    from sparrow.engines.musicgen import MusicGenEngine

    engine = MusicGenEngine(str(tiny_models.musicgen), device="cpu", decoder=request.param)
    engine.load()
    return engine


def rows() -> list[Row]:
    """Rows that differ in prompt, context, duration and seed; the last two fit one
    ``generate`` call together (same context length and sampling)."""
    return [
        Row(noise(1.0, 1), "slow jazz piano", 5, Sampling(duration_s=1.2)),
        Row(noise(0.6, 2), "drums", 6, Sampling(duration_s=0.5, top_k=50)),
        Row(noise(0.0, 3), "", 7, Sampling(duration_s=0.7, temperature=0.8)),
        Row(noise(0.8, 4), "a bass line", 8, Sampling(duration_s=0.6)),
        Row(noise(0.8, 5), "strings and a choir, warm", 9, Sampling(duration_s=0.6)),
    ]


def alone(engine: Any, row: Row) -> Audio:
    request = Continuation(row.context, (row.prompt,), (row.seed,), row.sampling)
    audio: Audio = engine.generate(request, lambda fraction: None)[0]
    return audio


def test_a_row_is_the_same_alone_or_batched_with_others(musicgen: Any) -> None:
    """The first row decodes alone for a while; the others join it (Sparrow's loop) or
    start together where they fit (generate); one more is cancelled midway. Every row
    that finished gives the bytes it gives alone."""
    expected = [alone(musicgen, row) for row in rows()]
    batcher = Batcher(musicgen, max_rows=8)
    try:
        first_seen = Seen()
        first = batcher.submit(rows()[0], first_seen, job_id="j0", owner="a")
        until(lambda: len(first_seen.fractions) >= 5, "the first row to decode")
        later = [Seen() for _ in range(4)]
        cancelled_seen = Seen(cancel_at=0.3)
        cancelled = batcher.submit(
            Row(noise(0.5, 9), "cancel me", 99, Sampling(duration_s=1.5)),
            cancelled_seen,
            job_id="j9",
            owner="c",
        )
        futures = [
            batcher.submit(row, seen, job_id=f"j{i}", owner="b")
            for i, (row, seen) in enumerate(zip(rows()[1:], later, strict=True), start=1)
        ]
        got = [wait(first)] + [wait(f) for f in futures]
        with pytest.raises(Cancelled):
            wait(cancelled)
    finally:
        batcher.close()
    for audio, want, row in zip(got, expected, rows(), strict=True):
        assert audio.shape == (round(row.sampling.duration_s * 32_000), 1)
        assert np.array_equal(audio, want)
    assert first_seen.fractions[-1] == 1.0 and all(s.fractions[-1] == 1.0 for s in later)
    assert cancelled_seen.fractions[-1] < 1.0
    if musicgen.decoder == "sparrow":
        # Joined mid-batch: the later rows made progress while the first was decoding.
        first_done = first_seen.at[-1]
        assert all(s.at[0] < first_done for s in later)


def test_each_row_finishing_in_a_step_is_handed_over_before_the_next_is_decoded(
    tiny_models: Any,
) -> None:
    """Two rows finish at the same step of Sparrow's loop: the first one's future holds
    its audio while the second's is still waiting to be turned into audio."""
    pytest.importorskip("torch", reason=ML_REASON)
    from sparrow.engines.musicgen import MusicGenEngine

    released = threading.Event()
    decoded: list[int] = []

    class Watched(MusicGenEngine):
        def batch(self) -> Any:
            batch: Any = super().batch()
            audio_of = batch._audio

            def held(decoding: Any) -> Audio:
                if decoded:  # the second row: only once the first was handed over
                    assert released.wait(WAIT_S), "the first row was not handed over"
                decoded.append(1)
                result: Audio = audio_of(decoding)
                return result

            batch._audio = held
            return batch

    watched = Watched(str(tiny_models.musicgen), device="cpu", decoder="sparrow")
    batcher = Batcher(watched, max_rows=8)
    same = Sampling(duration_s=0.3)
    try:
        with batcher._lock:  # both join at the same step boundary
            futures = [
                batcher.submit(Row(noise(0.5, i), "", i, same), lambda f: None) for i in (1, 2)
            ]
        first = wait(futures[0])
        assert not futures[1].done()
        released.set()
        second = wait(futures[1])
    finally:
        released.set()
        batcher.close()
    assert first.shape == second.shape == (round(0.3 * 32_000), 1)
    assert len(decoded) == 2


# -- the mock: fairness, failures ----------------------------------------------------------


class Gated(MockEngine):
    """The mock, recording the rows its batches take, whose first step waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__(step_ms=0)
        self.gate = threading.Event()
        self.added: list[Row] = []

    def batch(self) -> MockBatch:
        batch = super().batch()
        add, step = batch.add, batch.step

        def recording(row: Row) -> None:
            self.added.append(row)
            add(row)

        def gated(on_step: Callable[[], None]) -> list[tuple[Row, Audio]]:
            assert self.gate.wait(WAIT_S)
            return step(on_step)

        batch.add = recording  # type: ignore[method-assign]
        batch.step = gated  # type: ignore[method-assign]
        return batch


def test_rows_waiting_for_room_are_taken_fairly_across_owners_and_jobs() -> None:
    """A full batch decodes while one owner's 4-sibling request and three single requests
    of others wait: the next batch holds one of the siblings and the three singles."""
    engine = Gated()
    batcher = Batcher(engine, max_rows=4)
    short = Sampling(duration_s=0.1)

    def submit(owner: str, job: str, seed: int) -> Future[Audio]:
        row = Row(noise(0.0, 0), "", seed, short)
        return batcher.submit(row, lambda f: None, owner=owner, job_id=job, node_id=str(seed))

    try:
        with batcher._lock:  # the four arrive together: the batcher sees them at once
            busy = [submit("x", "busy", i) for i in range(4)]
        until(lambda: sum(v.decoding for v in batcher.rows()) == 4, "the first batch to fill")
        siblings = [submit("a", "eight", 10 + i) for i in range(4)]
        singles = [submit(owner, f"single-{owner}", 20 + i) for i, owner in enumerate("bcd")]
        views = batcher.rows()
        assert [v.decoding for v in views] == [True] * 4 + [False] * 7
        engine.gate.set()
        for future in busy + siblings + singles:
            wait(future)
    finally:
        batcher.close()
    second_batch = {row.seed for row in engine.added[4:8]}
    assert second_batch == {10, 20, 21, 22}
    assert [row.seed for row in engine.added[8:]] == [11, 12, 13]


class Failing(MockEngine):
    """The mock, whose batch fails at its third step once."""

    def __init__(self) -> None:
        super().__init__(step_ms=1)
        self.failed = False

    def batch(self) -> MockBatch:
        batch = super().batch()
        step = batch.step
        steps = 0

        def failing(on_step: Callable[[], None]) -> list[tuple[Row, Audio]]:
            nonlocal steps
            steps += 1
            if steps == 3 and not self.failed:
                self.failed = True
                raise GenerationFailed("MusicGen ran out of GPU memory; try fewer siblings.")
            return step(on_step)

        batch.step = failing  # type: ignore[method-assign]
        return batch


def test_a_failed_batch_fails_its_rows_and_the_next_rows_run() -> None:
    batcher = Batcher(Failing(), max_rows=4)
    try:
        row = Row(noise(0.0, 0), "", 1, Sampling(duration_s=0.5))
        doomed = [batcher.submit(row, lambda f: None), batcher.submit(row, lambda f: None)]
        for future in doomed:
            with pytest.raises(GenerationFailed, match="out of GPU memory"):
                wait(future)
        audio = wait(batcher.submit(row, lambda f: None))
        assert audio.shape == (16_000, 1)
    finally:
        batcher.close()


def test_rows_no_longer_wanted_never_join() -> None:
    engine = Gated()
    batcher = Batcher(engine, max_rows=1)
    row = Row(noise(0.0, 0), "", 1, Sampling(duration_s=0.1))
    try:
        running = batcher.submit(row, lambda f: None)
        until(lambda: any(v.decoding for v in batcher.rows()), "the first row to join")
        wanted = threading.Event()
        wanted.set()
        waiting = batcher.submit(row, lambda f: None, wanted=wanted.is_set)
        wanted.clear()  # cancelled while it waits
        engine.gate.set()
        wait(running)
        with pytest.raises(Cancelled):
            wait(waiting)
        assert len(engine.added) == 1
    finally:
        batcher.close()


def test_an_engine_that_cannot_load_fails_every_row() -> None:
    from sparrow.engines import UnavailableEngine

    batcher = Batcher(UnavailableEngine("musicgen", "m", "no model here"), max_rows=2)
    try:
        row = Row(noise(0.0, 0), "", 1, Sampling(duration_s=0.5))
        with pytest.raises(EngineUnavailable, match="no model here"):
            wait(batcher.submit(row, lambda f: None))
    finally:
        batcher.close()


def test_a_row_cancelled_as_its_window_ends_starts_no_other(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A long row decodes window after window in its slot; cancelled at the very step its
    first window ends, it leaves, and its second window never starts."""
    pytest.importorskip("torch", reason=ML_REASON)
    from sparrow.engines.musicgen import MusicGenEngine
    from sparrow.engines.tiny import make_tiny_musicgen

    folder = make_tiny_musicgen(tmp_path_factory.mktemp("window") / "m", window_s=1.0)
    engine = MusicGenEngine(str(folder), device="cpu", decoder="sparrow")
    batch = engine.batch()
    row = Row(noise(0.0, 0), "two windows", 3, Sampling(duration_s=1.5))
    batch.add(row)
    first_window = 50 + 3  # 1 s of codes, then the delay pattern's steps
    steps = first_window + 25 + 3  # the second: the half second left

    def on_step() -> None:
        if row.fraction >= first_window / steps:
            batch.remove(row)

    finished: list[tuple[Row, Any]] = []
    for _ in range(first_window):
        finished += batch.step(on_step)
    assert finished == [] and len(batch) == 0
    assert row.fraction == pytest.approx(first_window / steps)
