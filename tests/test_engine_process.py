"""The decoding loop in a process of its own (``sparrow.engines.process``), on the tiny
MusicGen: rows decoded in the child are the bytes they are in this process, rows join a
batch decoding there, a cancelled or unwanted row leaves alone, a child killed for real
fails its rows and the next row gets a fresh one, closing ends the child and refuses
rows, a model that cannot load says so, and a killed server leaves no child behind.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ML_REASON
from test_batching import Seen, alone, noise, rows, until, wait

from sparrow.engines.base import Cancelled, EngineInfo, Row
from sparrow.errors import EngineUnavailable, GenerationFailed
from sparrow.models import Sampling

pytest.importorskip("torch", reason=ML_REASON)

from sparrow.engines.musicgen import MusicGenEngine
from sparrow.engines.process import DecodingProcess

UNLOADED = EngineInfo("musicgen", "tiny", "cpu", loaded=False)


def decoding_process(model: str, max_rows: int) -> DecodingProcess:
    factory = functools.partial(MusicGenEngine, model, device="cpu", decoder="sparrow")
    return DecodingProcess(factory, max_rows, UNLOADED)


def child_pid(process: DecodingProcess) -> int:
    child = process._child
    assert child is not None and child.process.pid is not None
    return child.process.pid


@pytest.fixture(scope="module")
def here(tiny_models: Any) -> MusicGenEngine:
    engine = MusicGenEngine(str(tiny_models.musicgen), device="cpu", decoder="sparrow")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def process(tiny_models: Any) -> Iterator[DecodingProcess]:
    """Two rows at a time, so that a third waits to join. Started from a thread that then
    ends, as the worker's threads do: the child must outlive it."""
    decoding = decoding_process(str(tiny_models.musicgen), max_rows=2)
    starter = threading.Thread(target=decoding.engine.load)
    starter.start()
    starter.join()
    yield decoding
    decoding.close()


def test_the_model_loads_in_the_child_and_describes_itself(
    process: DecodingProcess, here: MusicGenEngine
) -> None:
    info = process.engine.info()
    assert info.loaded and info.engine == "musicgen" and info.extra["decoder"] == "sparrow"
    assert (process.engine.sample_rate, process.engine.channels) == (here.sample_rate, 1)
    assert child_pid(process) != os.getpid()


def test_rows_decode_in_the_child_with_the_bytes_they_have_here(
    process: DecodingProcess, here: MusicGenEngine
) -> None:
    """The first row decodes alone for a while; the others join it as room frees up."""
    expected = [alone(here, row) for row in rows()]
    first_seen = Seen()
    first = process.submit(rows()[0], first_seen, job_id="j0", owner="a", node_id="n0")
    until(lambda: len(first_seen.fractions) >= 3, "the first row to decode")
    later = [Seen() for _ in rows()[1:]]
    futures = [
        process.submit(row, seen, job_id=f"j{i}", owner="b", node_id=f"n{i}")
        for i, (row, seen) in enumerate(zip(rows()[1:], later, strict=True), start=1)
    ]
    views = process.rows()
    assert [v.node_id for v in views if v.decoding][:1] == ["n0"]
    assert {v.node_id for v in views} <= {f"n{i}" for i in range(len(rows()))}
    got = [wait(first)] + [wait(f) for f in futures]
    for audio, want, row in zip(got, expected, rows(), strict=True):
        assert audio.shape == (round(row.sampling.duration_s * 32_000), 1)
        assert np.array_equal(audio, want)
    assert first_seen.fractions[-1] == 1.0 and all(s.fractions[-1] == 1.0 for s in later)
    # Joined mid-batch: the second row made progress while the first was decoding.
    assert later[0].at[0] < first_seen.at[-1]
    assert process.rows() == []


def test_a_cancelled_row_and_an_unwanted_waiting_row_leave_the_others_running(
    process: DecodingProcess, here: MusicGenEngine
) -> None:
    keep = Row(noise(0.5, 11), "keep me", 12, Sampling(duration_s=1.0))
    expected = alone(here, keep)
    cancelled_seen = Seen(cancel_at=0.3)
    cancelled = process.submit(
        Row(noise(0.5, 13), "cancel me", 14, Sampling(duration_s=1.5)), cancelled_seen
    )
    kept = process.submit(keep, Seen())
    wanted = True
    waiting = process.submit(
        Row(noise(0.5, 15), "never mind", 16, Sampling(duration_s=1.0)),
        Seen(),
        wanted=lambda: wanted,
    )
    wanted = False  # before any room frees up: it never decodes
    with pytest.raises(Cancelled):
        wait(cancelled)
    with pytest.raises(Cancelled):
        wait(waiting)
    assert np.array_equal(wait(kept), expected)
    assert cancelled_seen.fractions[-1] < 1.0


def test_a_killed_child_fails_its_rows_the_next_row_gets_a_fresh_one_and_closing_ends_it(
    tiny_models: Any, here: MusicGenEngine
) -> None:
    decoding = decoding_process(str(tiny_models.musicgen), max_rows=4)
    try:
        seen = Seen()
        doomed = decoding.submit(Row(noise(0.5, 21), "", 22, Sampling(duration_s=8.0)), seen)
        until(lambda: len(seen.fractions) >= 2, "the row to decode")
        killed = child_pid(decoding)
        os.kill(killed, signal.SIGKILL)
        with pytest.raises(GenerationFailed, match="ended unexpectedly"):
            wait(doomed)
        assert not decoding.engine.info().loaded
        decoding.engine.load()  # as every job does before its rows: a fresh child
        assert child_pid(decoding) != killed and decoding.engine.info().loaded
        row = Row(noise(0.5, 23), "again", 24, Sampling(duration_s=0.5))
        assert np.array_equal(wait(decoding.submit(row, Seen())), alone(here, row))
        child = decoding._child
        assert child is not None
    finally:
        decoding.close()
    deadline = time.monotonic() + 10
    while child.process.is_alive():
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)
    assert child.process.exitcode == 0
    with pytest.raises(Cancelled):
        wait(decoding.submit(row, Seen()))


def test_a_model_that_cannot_load_fails_the_load_and_every_row(tmp_path: Any) -> None:
    decoding = decoding_process(str(tmp_path / "no-model"), max_rows=2)
    try:
        with pytest.raises(EngineUnavailable, match="not a folder"):
            decoding.engine.load()
        row = Row(noise(0.2, 31), "", 32, Sampling(duration_s=0.5))
        with pytest.raises(EngineUnavailable, match="not a folder"):
            wait(decoding.submit(row, Seen()))
        assert not decoding.engine.info().loaded
    finally:
        decoding.close()


def test_the_child_dies_with_a_killed_server(tiny_models: Any, tmp_path: Path) -> None:
    """A server process SIGKILLed while a long row decodes leaves no decoding process
    behind (nor its memory): the child does not even finish its step."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import functools, os, signal, threading
            import numpy as np
            from sparrow.engines.base import EngineInfo, Row
            from sparrow.engines.musicgen import MusicGenEngine
            from sparrow.engines.process import DecodingProcess
            from sparrow.models import Sampling

            if __name__ == "__main__":
                factory = functools.partial(MusicGenEngine, {str(tiny_models.musicgen)!r})
                decoding = DecodingProcess(factory, 1, EngineInfo("musicgen", "t", "cpu", False))
                decoding.engine.load()
                decoding_now = threading.Event()
                row = Row(np.zeros((0, 1), np.float32), "", 1, Sampling(duration_s=120.0))
                decoding.submit(row, lambda fraction: decoding_now.set())
                decoding_now.wait(60)
                print(decoding._child.process.pid, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    # Not waiting for the end of its output: the child holds the same pipe until it ends.
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE) as server:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        assert server.wait(timeout=120) == -signal.SIGKILL
    deadline = time.monotonic() + 2
    while alive(child):
        assert time.monotonic() < deadline, "the decoding process outlived the server"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False
