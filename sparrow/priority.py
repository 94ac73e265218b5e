"""Background work at the lowest CPU priority.

A node's analysis (librosa's tempo and key, FFmpeg's loudness) is work nobody waits
on: it runs after the node is ready. On a machine whose CPU also decodes (a CPU
deployment, or the FFmpeg passes and Encodec beside a GPU) it competes with the
rows still generating and with the requests. So it runs at nice 19 — its own thread
and the FFmpeg it starts — and the kernel's scheduler gives it the CPU nobody else
wants: about 1.5 % of a core while generation is busy, all of it when idle.

Linux keeps a nice value per thread, so lowering one thread leaves the rest of the
server as it was; an unprivileged process can never raise it back, so only threads
of their own are lowered. Elsewhere nothing is lowered.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

BACKGROUND_NICE = 19


def lower_this_thread() -> None:
    """Run the calling thread (alone) at ``BACKGROUND_NICE``, where the system allows it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def background_thread(name: str) -> ThreadPoolExecutor:
    """One thread of its own at ``BACKGROUND_NICE``, for background work."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=lower_this_thread)


@functools.cache
def nice_prefix() -> list[str]:
    """``nice -n 19`` where coreutils has it: a program it starts runs in the background."""
    nice = shutil.which("nice")
    return [nice, "-n", str(BACKGROUND_NICE)] if nice else []
