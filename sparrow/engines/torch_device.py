"""What the torch engines share (imported only by them): their device, their CPU
threads, and how their failures are told."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sparrow.engines.base import Cancelled, describe
from sparrow.errors import GenerationFailed

# A model this narrow or narrower decodes fastest on one thread: its operations take
# microseconds, and more threads only synchronise (and spin beside the server's own).
NARROW_HIDDEN = 256


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads_for(requested: int, hidden_size: int) -> int:
    """The intra-op threads a model on the CPU runs with: ``requested`` if set (> 0);
    else one for a narrow model, every usable core for the others. Measured inside
    ``sparrow serve`` on 2 cores (docs/performance.md): the tiny model makes 4 s in
    1.02 s on one thread, 1.21 s on two; musicgen-small's shape makes 0.5 s in 5.5 s
    on two, 6.5 s on one."""
    if requested > 0:
        return requested
    return 1 if hidden_size <= NARROW_HIDDEN else usable_cores()


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the block (None: left as they are), then as they were.
    The count belongs to the calling thread's parallel regions: set it where the model runs."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is there, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextmanager
def torch_failures(failed: str, *, out_of_memory: str) -> Iterator[None]:
    """Failures inside the block as ``GenerationFailed`` sentences (``failed: <the error>``,
    or ``out_of_memory`` after the GPU's cached memory is released); ``Cancelled`` passes."""
    try:
        yield
    except Cancelled:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise GenerationFailed(out_of_memory) from exc
    except Exception as exc:
        raise GenerationFailed(f"{failed}: {describe(exc)}") from exc
