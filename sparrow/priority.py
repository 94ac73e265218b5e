"""Background work at the lowest CPU priority.

A node's analysis (librosa's tempo and key, FFmpeg's loudness) is work nobody waits
on: it runs after the node is ready. On a machine whose CPU also decodes (a CPU
deployment, or the FFmpeg passes and Encodec beside a GPU) it competes with the
rows still generating and with the requests. So it runs at nice 19 — in a process
of its own, and the FFmpeg it starts — and the kernel's scheduler gives it the CPU
nobody else wants: about 1.5 % of a core while generation is busy, all of it when
idle.

A process, not a thread: librosa is Python and numpy that hold the interpreter's
lock most of the time, and a thread at nice 19 holds it while the scheduler keeps it
off the CPU, so every other thread of the server (the event loop, the decoding loop)
waits for a thread that does not run. In a process it holds its own lock.
``background`` spawns it once for the server (a fresh interpreter: forking a server
with threads is unsafe; so a program that embeds Sparrow guards its main module
with ``if __name__ == "__main__"``, as ``multiprocessing`` asks), lowers it and makes
it die with the server.

An unprivileged process can never raise a nice value back, so only processes of
their own are lowered, never the server. Elsewhere than Linux nothing is lowered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

BACKGROUND_NICE = 19
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BackgroundProcess:
    """The process for background work that runs Python: one for the whole server,
    spawned on first use and again after it ended (``forget``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._pid: int | None = None

    async def pool(self) -> ProcessPoolExecutor:
        """The process, started (its id known) before this returns."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_become_background,
                    initargs=(os.getpid(),),
                )
            pool = self._pool
        if self._pid is None:
            pid = await asyncio.get_running_loop().run_in_executor(pool, os.getpid)
            with self._lock:
                if self._pool is pool:
                    self._pid = pid
        return pool

    @property
    def pid(self) -> int | None:
        return self._pid

    def forget(self, *, kill: bool) -> None:
        """The next use starts a new process; ``kill``: this one stops now, whatever it
        is doing (background work only reads), else it is known to have ended."""
        with self._lock:
            pool, pid, self._pool, self._pid = self._pool, self._pid, None, None
        if pool is None:
            return
        if kill and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pool.shutdown(wait=False, cancel_futures=True)


background = BackgroundProcess()


def _become_background(parent: int) -> None:
    """In the spawned process: die with ``parent``, and run at ``BACKGROUND_NICE``."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it ended before the line above
            os._exit(1)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)


@functools.cache
def nice_prefix() -> list[str]:
    """``nice -n 19`` where coreutils has it: a program it starts runs in the background."""
    nice = shutil.which("nice")
    return [nice, "-n", str(BACKGROUND_NICE)] if nice else []
